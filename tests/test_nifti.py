"""NIfTI ingestion: nibabel's shipped files, 4D channels, scaling, sform/qform, bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medseg.errors import ScanError
from medseg.ingest import load, ref_for_path

NIBABEL_DATA = Path(data_path)


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "functional.nii", "standard.nii.gz", "example4d.nii.gz", "example_nifti2.nii.gz"]
)
def test_nibabel_shipped_files(name):
    img = nib.load(NIBABEL_DATA / name)
    scan = load(ref_for_path(NIBABEL_DATA / name))
    shape = img.shape
    channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    assert scan.array.shape == (channels,) + tuple(shape[:3])
    assert np.allclose(scan.geometry.affine, img.affine)
    data = np.asanyarray(img.dataobj)
    assert np.allclose(scan.array[0], data[..., 0] if data.ndim == 4 else data)


def test_4d_channels_last_becomes_channels_first(tmp_path):
    data = np.arange(4 * 5 * 6 * 2, dtype=np.int16).reshape(4, 5, 6, 2)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "two.nii.gz")
    scan = load(ref_for_path(tmp_path / "two.nii.gz"))
    assert scan.array.shape == (2, 4, 5, 6)
    assert np.array_equal(scan.array[1], data[..., 1])
    assert scan.geometry.spacing == (2.0, 2.0, 3.0)


def test_sform_preferred_over_qform_and_qform_used_alone(tmp_path):
    data = np.zeros((4, 4, 4), np.uint8)
    qform = np.diag([1.0, 1.0, 1.0, 1.0])
    sform = np.diag([-2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = (10, 20, 30)
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nib.save(img, tmp_path / "both.nii")
    assert np.allclose(load(ref_for_path(tmp_path / "both.nii")).geometry.affine, sform)
    img = nib.Nifti1Image(data, None)
    img.set_qform(sform, code=1)
    img.set_sform(np.eye(4), code=0)
    nib.save(img, tmp_path / "qonly.nii")
    assert np.allclose(load(ref_for_path(tmp_path / "qonly.nii")).geometry.affine, sform)


def test_scl_slope_inter_applied_any_dtype(tmp_path):
    raw = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "scaled.nii")
    scan = load(ref_for_path(tmp_path / "scaled.nii"))
    assert np.allclose(scan.array[0], raw * 0.5 - 3.0)
    assert scan.array.dtype == np.float32
    for dtype in (np.int8, np.uint16, np.int32, np.float64, np.float32):
        nib.save(nib.Nifti1Image(raw.astype(dtype), np.eye(4)), tmp_path / "d.nii")
        assert np.array_equal(load(ref_for_path(tmp_path / "d.nii")).array[0], raw)


def test_nan_and_inf_are_reported(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ScanError, match="2 voxels are NaN or Inf") as info:
        load(ref_for_path(tmp_path / "nan.nii.gz"))
    assert "nan.nii.gz" in str(info.value)


def test_singular_affine_is_reported(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), None)
    img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero column: no volume
    img.header.set_qform(None, code=0)
    nib.save(img, tmp_path / "flat.nii")
    with pytest.raises(ScanError, match="singular"):
        load(ref_for_path(tmp_path / "flat.nii"))


def test_declared_size_larger_than_file_is_reported(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    nib.save(img, tmp_path / "big.nii")
    raw = bytearray((tmp_path / "big.nii").read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    hdr.set_data_shape((4000, 4000, 4000))
    raw[:348] = hdr.binaryblock
    (tmp_path / "big.nii").write_bytes(bytes(raw))
    with pytest.raises(ScanError, match="header declares shape"):
        load(ref_for_path(tmp_path / "big.nii"))


def test_truncated_gzip_is_reported(tmp_path):
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)),
        tmp_path / "t.nii.gz",
    )
    data = (tmp_path / "t.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match="t.nii.gz"):
        load(ref_for_path(tmp_path / "t.nii.gz"))
