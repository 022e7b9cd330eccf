"""Geometry is finite and sane: a scan whose header cannot place voxels in space is refused with its reason.

NaN/Inf positions, zero or negative pixel spacing, degenerate orientation cosines, NaN or
singular NIfTI affines and zero pixdim each get a ScanError naming the file, the field and
its value, never a LinAlgError, a MONAI message or a mask that overlays nothing.
(All-zero ImageOrientationPatient and a NIfTI sform with a zero axis are in test_hostile.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile

from conftest import enhanced_multiframe, nifti_with_fields, set_dicom_text
from medseg.data import phantoms
from medseg.errors import ScanError
from medseg.geometry import Geometry, check_geometry, check_values
from medseg.ingest import READERS, Scan, ScanRef, load, ref_for_path

# --- DICOM --------------------------------------------------------------------------------


def _series(root: Path, slices: int = 3) -> list[Path]:
    return phantoms.write_dicom_series(phantoms.ct_phantom(shape=(8, 8, slices)), root / "ct")


DICOM_CASES = [
    ("ImagePositionPatient", "nan\\0\\0", "ImagePositionPatient (nan, 0, 0) is not finite"),
    ("ImagePositionPatient", "0\\inf\\0", "ImagePositionPatient (0, inf, 0) is not finite"),
    ("ImagePositionPatient", "-inf\\-inf\\-inf", "ImagePositionPatient (-inf, -inf, -inf) is not finite"),
    ("PixelSpacing", "0\\0.5", "PixelSpacing (0, 0.5) must be positive"),
    ("PixelSpacing", "-0.5\\0.5", "PixelSpacing (-0.5, 0.5) must be positive"),
    ("PixelSpacing", "nan\\1", "PixelSpacing (nan, 1) is not finite"),
    ("PixelSpacing", "1\\inf", "PixelSpacing (1, inf) is not finite"),
    (
        "ImageOrientationPatient",
        "1\\0\\0\\1\\0\\0",
        "ImageOrientationPatient [1.0, 0.0, 0.0, 1.0, 0.0, 0.0] is not two orthogonal",
    ),
    (
        "ImageOrientationPatient",
        "0\\0\\0\\0\\1\\0",
        "ImageOrientationPatient [0.0, 0.0, 0.0, 0.0, 1.0, 0.0] is not two orthogonal",
    ),
    (
        "ImageOrientationPatient",
        "0.6\\0.8\\0\\0.8\\0.6\\0",
        "ImageOrientationPatient [0.6, 0.8, 0.0, 0.8, 0.6, 0.0] is not two orth",
    ),
    ("ImageOrientationPatient", "nan\\0\\0\\0\\1\\0", "ImageOrientationPatient (nan, 0, 0, 0, 1, 0) is not finite"),
    ("ImageOrientationPatient", "1\\0\\0\\0\\inf\\0", "ImageOrientationPatient (1, 0, 0, 0, inf, 0) is not finite"),
]


@pytest.mark.parametrize("keyword, text, message", DICOM_CASES, ids=[f"{k}={t}" for k, t, _ in DICOM_CASES])
def test_dicom_series_with_insane_geometry_is_refused(tmp_path, keyword, text, message):
    paths = _series(tmp_path)
    for path in paths:
        set_dicom_text(path, **{keyword: text})
    with pytest.raises(ScanError) as info:
        load(ref_for_path(tmp_path / "ct"))
    assert message in str(info.value) and paths[0].name in str(info.value), str(info.value)


@pytest.mark.parametrize("keyword, text, message", DICOM_CASES[:7], ids=[f"{k}={t}" for k, t, _ in DICOM_CASES[:7]])
def test_one_bad_slice_is_named(tmp_path, keyword, text, message):
    paths = _series(tmp_path, slices=6)
    set_dicom_text(paths[4], **{keyword: text})
    with pytest.raises(ScanError) as info:
        load(ScanRef("ct", "dicom", tuple(paths)))
    assert str(info.value).startswith(f"{paths[4]}: {message}"), str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0\\0", "ImagerPixelSpacing (0, 0) must be positive"),
        ("nan\\0.2", "ImagerPixelSpacing (nan, 0.2) is not finite"),
    ],
)
def test_imager_pixel_spacing_is_checked_too(tmp_path, text, message):
    paths = _series(tmp_path)
    for path in paths:
        set_dicom_text(path, PixelSpacing=None, ImagerPixelSpacing=text)
    with pytest.raises(ScanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(ref_for_path(tmp_path / "ct"))


@pytest.mark.parametrize("thickness", ["nan", "inf"])
def test_single_slice_with_non_finite_thickness_is_refused(tmp_path, thickness):
    path = _series(tmp_path, slices=1)[0]
    set_dicom_text(path, SliceThickness=thickness)
    with pytest.raises(ScanError) as info:
        load(ref_for_path(path))
    message = str(info.value)
    assert path.name in message and "slice spacing gives an affine with NaN or Inf" in message, message


def _enhanced(tmp_path: Path) -> Path:
    return enhanced_multiframe(_series(tmp_path, slices=4), tmp_path / "mf" / "enhanced.dcm")


@pytest.mark.parametrize(
    "where, text, message",
    [
        ("position", "0\\nan\\0", "frame 3 ImagePositionPatient (0, nan, 0) is not finite"),
        ("spacing", "0\\0", "PixelSpacing (0, 0) must be positive"),
        ("spacing", "-1\\1", "PixelSpacing (-1, 1) must be positive"),
    ],
)
def test_enhanced_multiframe_functional_groups_are_checked(tmp_path, where, text, message):
    path = _enhanced(tmp_path)
    ds = pydicom.dcmread(path)
    if where == "position":
        item = ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
        tag = pydicom.datadict.tag_for_keyword("ImagePositionPatient")
    else:
        item = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        tag = pydicom.datadict.tag_for_keyword("PixelSpacing")
    item[tag] = pydicom.DataElement(tag, "LO", text)
    ds.save_as(path)
    with pytest.raises(ScanError) as info:
        load(ref_for_path(path))
    assert "enhanced.dcm" in str(info.value) and message in str(info.value), str(info.value)


def test_grid_frame_offsets_must_be_finite(tmp_path):
    ds = pydicom.dcmread(_series(tmp_path, slices=1)[0])
    ds.NumberOfFrames = 3
    ds.PixelData = np.zeros((3, 8, 8), np.uint16).tobytes()
    tag = pydicom.datadict.tag_for_keyword("GridFrameOffsetVector")
    ds[tag] = pydicom.DataElement(tag, "LO", "0\\nan\\5")
    (tmp_path / "nm").mkdir()
    ds.save_as(tmp_path / "nm" / "frames.dcm")
    with pytest.raises(ScanError, match=r"frames.dcm.*GridFrameOffsetVector \(0, nan, 5\) is not finite"):
        load(ref_for_path(tmp_path / "nm" / "frames.dcm"))


# --- NIfTI --------------------------------------------------------------------------------


NAN, INF = float("nan"), float("inf")
NIFTI_CASES = [
    ("sform NaN", {"srow_x": [NAN, 0, 0, 0]}, "the sform (srow_x (nan, 0, 0, 0)"),
    ("sform Inf", {"srow_y": [0, 2, 0, INF]}, "srow_y (0, 2, 0, inf)"),
    ("sform parallel axes", {"srow_x": [2, 2, 0, 0], "srow_y": [0, 0, 0, 0]}, "its axes are (nearly) parallel"),
    (
        "qform quaternion NaN",
        {"sform_code": 0, "qform_code": 1, "quatern_b": NAN},
        "the qform (quatern_b/c/d (nan, 0, 0)",
    ),
    ("qform offset Inf", {"sform_code": 0, "qform_code": 1, "qoffset_y": -INF}, "qoffset_x/y/z (0, -inf, 0)"),
    (
        "pixdim 0 under a qform",
        {"sform_code": 0, "qform_code": 1, "pixdim1": 0.0},
        "pixdim[1:4] (voxel size) (0, 2, 3) is 0 along axis 1",
    ),
    ("pixdim 0 without forms", {"sform_code": 0, "qform_code": 0, "pixdim3": 0.0}, "(2, 2, 0) is 0 along axis 3"),
    ("pixdim 0 beside a sform", {"pixdim2": 0.0}, "(2, 0, 3) is 0 along axis 2"),
    ("pixdim NaN", {"pixdim2": NAN}, "pixdim[1:4] (voxel size) (2, nan, 3) is not finite"),
    ("pixdim Inf", {"sform_code": 0, "qform_code": 0, "pixdim1": INF}, "(inf, 2, 3) is not finite"),
]


@pytest.mark.parametrize("fields, message", [c[1:] for c in NIFTI_CASES], ids=[c[0] for c in NIFTI_CASES])
def test_nifti_with_insane_geometry_is_refused(tmp_path, fields, message):
    path = nifti_with_fields(tmp_path / "vol.nii", **fields)
    with pytest.raises(ScanError) as info:
        load(ref_for_path(path))
    assert "vol.nii" in str(info.value) and message in str(info.value), str(info.value)


def test_nifti_that_only_looks_odd_still_loads(tmp_path):
    """A sheared (non-orthogonal but invertible) sform and a negative pixdim are valid NIfTI: they load."""
    path = nifti_with_fields(tmp_path / "shear.nii", srow_x=[2, 0.5, 0, 0], pixdim1=-2.0)
    scan = load(ref_for_path(path))
    assert scan.geometry.affine[0, 1] == pytest.approx(0.5)


# --- microscopy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, message",
    [(0.0, "must be positive"), (-2.0, "must be positive"), (NAN, "is not finite"), (INF, "is not finite")],
)
def test_imagej_z_spacing_is_checked(tmp_path, spacing, message):
    tifffile.imwrite(
        tmp_path / "stack.tif",
        np.zeros((3, 8, 8), np.uint8),
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"spacing": spacing, "unit": "um", "axes": "ZYX"},
    )
    with pytest.raises(ScanError) as info:
        load(ref_for_path(tmp_path / "stack.tif"))
    assert (
        "stack.tif" in str(info.value)
        and "pixel size (x, y, z) in mm" in str(info.value)
        and message in str(info.value)
    )


def test_z_spacing_of_a_single_plane_is_not_held_against_it(tmp_path):
    tifffile.imwrite(
        tmp_path / "plane.tif",
        np.zeros((8, 8), np.uint8),
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"spacing": 0.0, "unit": "um"},
    )
    scan = load(ref_for_path(tmp_path / "plane.tif"))
    assert scan.geometry.spacing[:2] == pytest.approx((5e-4, 5e-4))


def test_ome_physical_size_inf_is_refused(tmp_path):
    tifffile.imwrite(
        tmp_path / "s.ome.tif",
        np.zeros((3, 8, 8), np.uint8),
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": INF, "PhysicalSizeY": 1.0, "PhysicalSizeZ": 2.0},
    )
    with pytest.raises(
        ScanError, match=r"s.ome.tif: pixel size \(x, y, z\) in mm .* \(inf, 0.001, 0.002\) is not finite"
    ):
        load(ref_for_path(tmp_path / "s.ome.tif"))


# --- the checks themselves ----------------------------------------------------------------


SANE = [
    ("EM pixels of 4 nm", np.diag([4e-6, 4e-6, 5e-5, 1.0])),
    ("oblique CT", phantoms.ct_phantom(shape=(8, 8, 3), oblique=(10.0, 20.0, 30.0)).affine),
    (
        "sheared by 30 degrees",
        np.array([[1.0, np.tan(np.radians(30)), 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    ),
    ("LPS flip", np.diag([-0.7, -0.7, 2.5, 1.0])),
]


@pytest.mark.parametrize("affine", [a for _, a in SANE], ids=[n for n, _ in SANE])
def test_sane_grids_pass(affine):
    check_geometry("x.nii", affine, (8, 8, 3), "test")


INSANE = [
    ("empty axis", np.eye(4), (8, 0, 3), "has an empty axis"),
    ("3x3 affine", np.eye(3), (8, 8, 3), "not 4x4"),
    ("NaN origin", np.array([[1, 0, 0, np.nan], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), (8, 8, 3), "NaN or Inf"),
    ("zero axis", np.diag([1.0, 1.0, 0.0, 1.0]), (8, 8, 3), "array axis 2 has zero length"),
    ("femtometre axis", np.diag([1.0, 1e-13, 1.0, 1.0]), (8, 8, 3), "array axis 1 has zero length"),
    (
        "nearly parallel",
        np.array([[1, 1, 0, 0], [0, 1e-7, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
        (8, 8, 3),
        "nearly) parallel",
    ),
]


@pytest.mark.parametrize("affine, shape, message", [c[1:] for c in INSANE], ids=[c[0] for c in INSANE])
def test_insane_grids_are_refused_with_their_source(affine, shape, message):
    with pytest.raises(ScanError) as info:
        check_geometry(Path("scan.nii"), affine, shape, "the sform (srow_x ...)")
    assert str(info.value).startswith("scan.nii: ") and message in str(info.value), str(info.value)


def test_check_values_names_the_attribute_and_value():
    assert check_values("a.dcm", "PixelSpacing", ["0.5", 0.25], positive=True).tolist() == [0.5, 0.25]
    with pytest.raises(ScanError, match=r"a.dcm: PixelSpacing \(0.5, -0.25\) must be positive"):
        check_values("a.dcm", "PixelSpacing", [0.5, -0.25], positive=True)
    assert check_values("a.dcm", "ImagePositionPatient", [-10.0, 0.0, 5.0]).size == 3  # negative positions are fine


def test_load_refuses_a_reader_that_hands_on_a_nan_grid(tmp_path, monkeypatch):
    """The last line of defence: whatever a reader missed, load() does not pass a NaN affine on."""
    path = nifti_with_fields(tmp_path / "v.nii")

    def careless(ref, options):
        return Scan(
            ref=ref,
            array=np.zeros((1, 4, 4, 4), np.float32),
            geometry=Geometry(np.full((4, 4), np.nan), (4, 4, 4)),
            modality="",
        )

    monkeypatch.setitem(READERS, "nifti", careless)
    with pytest.raises(ScanError, match=r"v.nii: the nifti reader's grid gives an affine with NaN or Inf values"):
        load(ref_for_path(path))
