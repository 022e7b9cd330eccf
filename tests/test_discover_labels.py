"""Discovery over mixed folders, reference-mask validation, and the read-only promise."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.data import phantoms
from medseg.errors import LabelError, ScanError
from medseg.ingest import discover, load, load_label, ref_for_path

from conftest import open_files, snapshot


def test_sample_study_discovers_every_kind(sample_study):
    found = discover(sample_study["images"])
    assert [(s.id, s.kind) for s in found.scans] == [
        ("ct_series", "dicom"),
        ("ct_volume", "nifti"),
        ("em_sequence", "image-sequence"),
        ("em_stack", "tiff"),
    ]
    assert not found.problems and not found.skipped
    labels = {s.id for s in discover(sample_study["labels"]).scans}
    assert labels == {s.id for s in found.scans}  # references pair with scans by id


def test_mixed_good_and_bad_folder_returns_good_and_reports_bad(tmp_path, sample_study):
    mixed = tmp_path / "mixed"
    shutil.copytree(sample_study["images"], mixed)
    (mixed / "empty.nii.gz").write_bytes(b"")
    (mixed / "notes.txt").write_text("hello")
    (mixed / "fake.nii").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 400)
    series = sorted((mixed / "ct_series").iterdir())
    series[5].unlink()  # a missing slice spoils that series
    bad = phantoms.ct_phantom(shape=(12, 12, 4))
    bad_nifti = phantoms.write_nifti(bad.image.astype(np.float32), bad.affine, mixed / "nan.nii.gz")
    img = nib.load(bad_nifti)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), bad_nifti)
    found = discover(mixed)
    ids = [s.id for s in found.scans]
    assert ids == ["ct_volume", "em_sequence", "em_stack", "nan"]
    reasons = {os.path.basename(str(p.paths[0])): p.reason for p in found.problems}
    assert "empty file" in reasons["empty.nii.gz"]
    assert "PNG" in reasons["fake.nii"]
    assert any("non-uniform slice spacing" in r for r in reasons.values())
    assert [p.paths[0].name for p in found.skipped] == ["notes.txt"]
    # the NaN volume is found but refuses to load, with its reason
    with pytest.raises(Exception, match="NaN"):
        load(found.scans[-1])


def test_pipes_and_devices_are_never_opened_and_are_listed(tmp_path):
    """Opening a FIFO waits for a writer and a device never ends: listed as skipped, and refused as the input."""
    phantoms.write_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), tmp_path / "d" / "ok.nii.gz")
    os.mkfifo(tmp_path / "d" / "pipe.nii.gz")
    (tmp_path / "d" / "zero.dcm").symlink_to("/dev/zero")
    found = discover(tmp_path / "d")
    assert [s.id for s in found.scans] == ["ok"] and not found.problems
    assert sorted(p.paths[0].name for p in found.skipped if "not a regular file" in p.reason) == [
        "pipe.nii.gz",
        "zero.dcm",
    ]
    with pytest.raises(ScanError, match=r"pipe.nii.gz: is not a regular file or folder \(a pipe, socket or device\)"):
        discover(tmp_path / "d" / "pipe.nii.gz")


def test_reading_never_modifies_or_holds_inputs(sample_study):
    before = snapshot(sample_study["images"].parent)
    found = discover(sample_study["images"])
    for ref in found.scans:
        scan = load(ref)
        load_label(
            ref_for_path(
                sample_study["labels"] / (ref.id + (".nii.gz" if ref.id.startswith("ct") else ".tif"))
                if not ref.id == "em_sequence"
                else sample_study["labels"] / "em_sequence"
            ),
            scan,
        )
    assert snapshot(sample_study["images"].parent) == before
    held = {p for p in open_files() if str(sample_study["images"].parent) in p}
    assert not held


# --- labels ---------------------------------------------------------------------------


@pytest.fixture
def ct_scan(tmp_path):
    ct = phantoms.ct_phantom(shape=(16, 12, 6))
    phantoms.write_nifti(ct.image, ct.affine, tmp_path / "img.nii.gz")
    return ct, load(ref_for_path(tmp_path / "img.nii.gz"))


def test_label_loads_and_matches(tmp_path, ct_scan):
    ct, scan = ct_scan
    phantoms.write_nifti(ct.label, ct.affine, tmp_path / "lab.nii.gz")
    label = load_label(tmp_path / "lab.nii.gz", scan, classes=[0, 1, 2, 3])
    assert np.array_equal(label.array[0], ct.label)
    assert label.array.dtype == np.uint8


def test_label_on_other_grid_is_refused(tmp_path, ct_scan):
    ct, scan = ct_scan
    shifted = ct.affine.copy()
    shifted[0, 3] += 2.0
    phantoms.write_nifti(ct.label, shifted, tmp_path / "lab.nii.gz")
    with pytest.raises(LabelError, match="label grid does not match"):
        load_label(tmp_path / "lab.nii.gz", scan)
    phantoms.write_nifti(ct.label[:, :, :5], ct.affine, tmp_path / "short.nii.gz")
    with pytest.raises(LabelError, match="shape"):
        load_label(tmp_path / "short.nii.gz", scan)


def test_float_label_holding_integers_is_cast(tmp_path, ct_scan):
    ct, scan = ct_scan
    phantoms.write_nifti(ct.label.astype(np.float32), ct.affine, tmp_path / "f.nii.gz")
    label = load_label(tmp_path / "f.nii.gz", scan, classes=[0, 1, 2, 3])
    assert label.array.dtype == np.uint8 and np.array_equal(label.array[0], ct.label)
    frac = ct.label.astype(np.float32)
    frac[0, 0, 0] = 0.5
    phantoms.write_nifti(frac, ct.affine, tmp_path / "frac.nii.gz")
    with pytest.raises(LabelError, match="non-integer"):
        load_label(tmp_path / "frac.nii.gz", scan)


def test_label_values_outside_classes_are_refused(tmp_path, ct_scan):
    ct, scan = ct_scan
    phantoms.write_nifti(ct.label, ct.affine, tmp_path / "lab.nii.gz")
    with pytest.raises(LabelError, match=r"label values \[2, 3\] are not among the configured classes") as info:
        load_label(tmp_path / "lab.nii.gz", scan, classes=[0, 1])
    assert "data.classes" in str(info.value)


def test_rgb_label_is_refused(tmp_path):
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "lab.png")
    scan = load(ref_for_path(tmp_path / "img.png"))
    from medseg.ingest import LoadOptions, validate_label

    rgb = load(ref_for_path(tmp_path / "lab.png"), LoadOptions(color="channels"))
    with pytest.raises(LabelError, match="3 channels"):
        validate_label(rgb, scan)


def test_png_label_without_pixel_size_adopts_image_grid(tmp_path):
    em = phantoms.em_phantom(shape=(20, 16, 3))
    phantoms.write_tiff_stack(em.image, em.affine, tmp_path / "img.tif")
    phantoms.write_png_sequence(em.label, tmp_path / "lab")
    scan = load(ref_for_path(tmp_path / "img.tif"))
    label = load_label(tmp_path / "lab", scan, classes=[0, 255])
    assert label.geometry == scan.geometry or np.allclose(label.geometry.affine, scan.geometry.affine)
    assert np.array_equal(label.array[0], em.label)
