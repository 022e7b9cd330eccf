"""DICOM ingestion: geometry round trips against the phantom's truth, samples, and bad series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medseg.data import phantoms
from medseg.errors import ScanError
from medseg.ingest import ScanRef, discover, load, ref_for_path
from medseg.ingest.dicom_series import plan_series

from conftest import open_files, snapshot

TOL_MM = 1e-4


def _load_folder(folder: Path):
    found = discover(folder)
    assert not found.problems, found.problems
    assert len(found.scans) == 1, found.scans
    return load(found.scans[0])


def _assert_matches_truth(scan, truth: phantoms.Phantom):
    assert scan.geometry.shape == truth.image.shape
    assert np.abs(scan.geometry.affine - truth.affine).max() < TOL_MM
    assert np.array_equal(scan.array[0], truth.image)


@pytest.mark.parametrize("order", ["sequential", "reversed", "shuffled"])
@pytest.mark.parametrize("oblique", [False, True])
def test_series_round_trip_equals_truth(tmp_path, order, oblique):
    truth = phantoms.ct_phantom(oblique=(25.0, -15.0, 30.0) if oblique else None, seed=2)
    phantoms.write_dicom_series(truth, tmp_path / "s", order=order, seed=5)
    scan = _load_folder(tmp_path / "s")
    _assert_matches_truth(scan, truth)
    assert scan.modality == "CT"
    assert scan.array.dtype == np.int16  # intercept -1024 applied, still integer


def test_oblique_world_coordinates_of_every_voxel_match_nifti(tmp_path, oblique_ct):
    phantoms.write_dicom_series(oblique_ct, tmp_path / "dcm", order="shuffled", extension="")
    phantoms.write_nifti(oblique_ct.image, oblique_ct.affine, tmp_path / "ct.nii.gz")
    from_dicom = _load_folder(tmp_path / "dcm")
    from_nifti = load(ref_for_path(tmp_path / "ct.nii.gz"))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in oblique_ct.image.shape], indexing="ij"), -1).reshape(-1, 3)
    world_dicom = from_dicom.geometry.world(idx)
    world_nifti = from_nifti.geometry.world(idx)
    world_truth = (np.c_[idx, np.ones(len(idx))] @ oblique_ct.affine.T)[:, :3]
    # float32 NIfTI header: within 1e-4 mm of the truth at every voxel; DICOM strings too
    assert np.abs(world_dicom - world_truth).max() < TOL_MM * 10
    assert np.abs(world_nifti - world_truth).max() < TOL_MM * 10
    assert np.array_equal(from_dicom.array, from_nifti.array)


def test_files_without_extension_and_shuffled_instance_numbers(tmp_path, ct):
    phantoms.write_dicom_series(ct, tmp_path / "s", order="shuffled", extension="")
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in sorted((tmp_path / "s").iterdir())]
    assert numbers == sorted(numbers)  # file name order == InstanceNumber order, both shuffled vs space
    _assert_matches_truth(_load_folder(tmp_path / "s"), ct)


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000", "jpegls"])
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax):
    truth = phantoms.ct_phantom(shape=(40, 36, 4), seed=1)  # J2K needs >= 32 px tiles
    paths = phantoms.write_dicom_series(truth, tmp_path / syntax, transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID.is_compressed
    _assert_matches_truth(_load_folder(tmp_path / syntax), truth)


def test_rescale_slope_and_intercept_applied(tmp_path):
    truth = phantoms.ct_phantom(shape=(16, 16, 4))
    phantoms.write_dicom_series(truth, tmp_path / "s", rescale_slope=2.0)
    scan = _load_folder(tmp_path / "s")
    assert scan.array.dtype == np.float32
    assert np.abs(scan.array[0] - truth.image).max() <= 1.0  # stored values rounded to the slope


def test_blank_series_uid_groups_by_frame_of_reference_and_orientation(tmp_path):
    a = phantoms.ct_phantom(shape=(16, 16, 5), seed=1)
    b = phantoms.ct_phantom(shape=(16, 16, 5), oblique=(0, 0, 90), seed=2)
    phantoms.write_dicom_series(a, tmp_path / "mix" / "a", series_uid=None, series_description="a")
    phantoms.write_dicom_series(b, tmp_path / "mix" / "b", series_uid=None, series_description="b")
    found = discover(tmp_path / "mix")
    assert not found.problems
    assert sorted(len(s.paths) for s in found.scans) == [5, 5]
    for scan_ref in found.scans:
        scan = load(scan_ref)
        truth = a if "a" in scan_ref.id else b
        assert np.abs(scan.geometry.affine - truth.affine).max() < TOL_MM


def test_two_series_in_one_folder_are_separated(tmp_path):
    a = phantoms.ct_phantom(shape=(16, 16, 5), seed=1)
    b = phantoms.ct_phantom(shape=(12, 16, 7), seed=2)
    phantoms.write_dicom_series(a, tmp_path / "x", series_description="first")
    # write the second series beside the first under other names
    tmp = tmp_path / "tmp"
    for p in phantoms.write_dicom_series(b, tmp, series_description="second", seed=9):
        shutil.move(p, tmp_path / "x" / ("B" + p.name))
    found = discover(tmp_path / "x")
    assert not found.problems
    assert sorted(len(s.paths) for s in found.scans) == [5, 7]
    assert len({s.id for s in found.scans}) == 2


def test_enhanced_multiframe_matches_single_frame_series(tmp_path, oblique_ct):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = phantoms.write_dicom_series(oblique_ct, tmp_path / "s")
    datasets = [pydicom.dcmread(p) for p in paths]
    enhanced = LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    out = tmp_path / "mf" / "enhanced.dcm"
    out.parent.mkdir()
    enhanced.save_as(out)
    scan = load(ref_for_path(out))
    assert scan.geometry.shape == oblique_ct.image.shape
    assert np.abs(scan.geometry.affine - oblique_ct.affine).max() < TOL_MM
    assert np.array_equal(scan.array[0], oblique_ct.image)
    assert len(scan.metadata["frame_order"]) == oblique_ct.image.shape[2]


def test_metadata_holds_uids_in_slice_order(tmp_path, ct):
    paths = phantoms.write_dicom_series(ct, tmp_path / "s", order="reversed")
    scan = _load_folder(tmp_path / "s")
    expected = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]  # writer returns slice order
    assert scan.metadata["sop_instance_uids"] == expected
    first = pydicom.dcmread(paths[0])
    assert scan.metadata["series_instance_uid"] == first.SeriesInstanceUID
    assert scan.metadata["frame_of_reference_uid"] == first.FrameOfReferenceUID
    assert scan.metadata["study_instance_uid"] == first.StudyInstanceUID


# --- pydicom's shipped sample files ------------------------------------------------------


def _sample(name: str) -> Path:
    return Path(get_testdata_file(name))


def _expected_affine(ds) -> np.ndarray:
    """Reference affine built independently from the header (single slice)."""
    iop = np.array(ds.ImageOrientationPatient, float)
    ipp = np.array(ds.ImagePositionPatient, float)
    ps = np.array(ds.PixelSpacing, float)
    normal = np.cross(iop[:3], iop[3:])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * ps[1], iop[3:] * ps[0]
    lps[:3, 2] = normal * float(ds.SliceThickness)
    lps[:3, 3] = ipp
    return np.diag([-1, -1, 1, 1]) @ lps


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_pydicom_samples_load_with_geometry(tmp_path, name):
    src = _sample(name)
    copy = tmp_path / name
    shutil.copy(src, copy)
    before = snapshot(tmp_path)
    scan = load(ref_for_path(copy))
    ds = pydicom.dcmread(src)
    assert scan.array.shape == (1, ds.Columns, ds.Rows, 1)
    assert np.allclose(scan.geometry.affine, _expected_affine(ds), atol=1e-4)
    raw = ds.pixel_array.T.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    assert np.array_equal(scan.array[0, :, :, 0], raw)
    assert snapshot(tmp_path) == before
    assert str(copy) not in open_files()


def test_compressed_variants_equal_uncompressed():
    reference = load(ref_for_path(_sample("MR_small.dcm"))).array
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(load(ref_for_path(_sample(name))).array, reference), name


def test_shipped_multiframe_without_geometry_loads_as_stack():
    scan = load(ref_for_path(_sample("examples_ybr_color.dcm")))  # 30-frame US, YBR JPEG
    ds = pydicom.dcmread(_sample("examples_ybr_color.dcm"), stop_before_pixels=True)
    assert scan.array.shape == (1, ds.Columns, ds.Rows, 30)  # grey by default
    assert any("no patient geometry" in n for n in scan.notes)
    assert not scan.geometry.spacing_known
    from medseg.ingest import LoadOptions

    rgb = load(ref_for_path(_sample("examples_ybr_color.dcm")), LoadOptions(color="channels"))
    assert rgb.array.shape == (3, ds.Columns, ds.Rows, 30)


def test_non_image_objects_are_skipped_with_a_note(tmp_path):
    for name in ("rtplan.dcm", "reportsi.dcm", "rtdose.dcm", "liver_1frame.dcm"):
        shutil.copy(_sample(name), tmp_path / name)
    shutil.copy(_sample("CT_small.dcm"), tmp_path / "ct.dcm")
    found = discover(tmp_path)
    assert [s.paths[0].name for s in found.scans] == ["ct.dcm"]
    assert not found.problems
    reasons = {p.paths[0].name: p.reason for p in found.skipped}
    assert "RTPLAN" in reasons["rtplan.dcm"]
    assert "SR" in reasons["reportsi.dcm"]
    assert "RTDOSE" in reasons["rtdose.dcm"]
    assert "SEG" in reasons["liver_1frame.dcm"]


# --- bad series: each gets an error naming the series and its files -----------------------


def _series(tmp_path, shape=(16, 14, 8), **kw) -> list[Path]:
    return phantoms.write_dicom_series(phantoms.ct_phantom(shape=shape, seed=4), tmp_path / "s", **kw)


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _problem(folder: Path) -> str:
    found = discover(folder)
    assert not found.scans, found.scans
    assert len(found.problems) == 1, found.problems
    return found.problems[0].reason


def test_missing_slice_is_reported(tmp_path):
    paths = _series(tmp_path)
    paths[4].unlink()
    reason = _problem(tmp_path / "s")
    assert "non-uniform slice spacing" in reason and "missing" in reason
    with pytest.raises(ScanError, match="non-uniform slice spacing") as info:
        load(ScanRef("s", "dicom", tuple(p for p in paths if p.exists())))
    assert paths[0] in info.value.paths


def test_duplicate_positions_are_reported(tmp_path):
    paths = _series(tmp_path)
    shutil.copy(paths[3], tmp_path / "s" / "copy.dcm")
    _edit(tmp_path / "s" / "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    reason = _problem(tmp_path / "s")
    assert "duplicate positions" in reason
    assert paths[3].name in reason or "copy.dcm" in reason


def test_mixed_orientation_is_reported(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[2], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    # same SeriesInstanceUID, different plane: not one volume
    reason = _problem(tmp_path / "s")
    assert "mixes image orientations" in reason


def test_gantry_tilt_is_reported(tmp_path):
    paths = _series(tmp_path)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[1] += k * 2.5 * np.tan(np.radians(15))  # shift each slice sideways: 15 degree tilt
        _edit(p, ImagePositionPatient=[f"{v:.6f}" for v in ipp])
    reason = _problem(tmp_path / "s")
    assert "gantry-tilted by 15.00 degrees" in reason


def test_mixed_rows_columns_is_reported(tmp_path):
    paths = _series(tmp_path)
    small = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(10, 10, 8)), tmp_path / "other")
    ds = pydicom.dcmread(small[0])
    ds.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    ds.save_as(tmp_path / "s" / "odd.dcm")
    reason = _problem(tmp_path / "s")
    assert "mixes image sizes" in reason


def test_truncated_file_is_reported(tmp_path):
    paths = _series(tmp_path, shape=(16, 14, 3))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    found = discover(tmp_path / "s")
    assert any("truncated" in p.reason and p.paths == (paths[1],) for p in found.problems)
    shutil.copy(_sample("MR_truncated.dcm"), tmp_path / "mr.dcm")
    with pytest.raises(ScanError, match="truncated"):
        load(ref_for_path(tmp_path / "mr.dcm"))


def test_non_dicom_file_named_dcm_is_reported(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "fake.png")
    (tmp_path / "fake.png").rename(tmp_path / "scan.dcm")
    found = discover(tmp_path)
    assert not found.scans
    assert "PNG" in found.problems[0].reason and "not DICOM" in found.problems[0].reason


def test_missing_pixel_data_is_reported(tmp_path):
    paths = _series(tmp_path, shape=(16, 14, 3))
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    found = discover(tmp_path / "s")
    assert any("no pixel data" in p.reason for p in found.problems)


def test_plan_does_not_need_pixels(tmp_path, oblique_ct):
    paths = phantoms.write_dicom_series(oblique_ct, tmp_path / "s", order="shuffled")
    plan = plan_series(sorted(paths))
    assert list(plan.paths) == paths  # writer returns files in slice order
    assert np.abs(plan.geometry.affine - oblique_ct.affine).max() < TOL_MM
