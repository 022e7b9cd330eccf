"""Edge cases found in review: each once read wrong or raised a raw library error."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from medseg.data import phantoms
from medseg.errors import ScanError
from medseg.ingest import LoadOptions, discover, load, load_label, ref_for_path


def test_uncompressed_nifti2_is_recognised(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nib.save(nib.Nifti2Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "n2.nii")
    scan = load(ref_for_path(tmp_path / "n2.nii"))
    assert np.array_equal(scan.array[0], data) and scan.metadata["nifti_version"] == 2


@pytest.mark.parametrize("dpi", [72, 96])
def test_default_png_dpi_is_not_a_pixel_size(tmp_path, dpi):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d.png", dpi=(dpi, dpi))
    assert not load(ref_for_path(tmp_path / "d.png")).geometry.spacing_known


def test_tiff_channel_axis_keeps_every_channel(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 2, 8, 9), dtype=np.uint8)  # Z C Y X
    tifffile.imwrite(tmp_path / "c2.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    scan = load(ref_for_path(tmp_path / "c2.tif"))
    assert scan.array.shape == (2, 9, 8, 3)
    assert not any("alpha" in n for n in scan.notes)
    assert np.array_equal(scan.array[1, :, :, 2], data[2, 1].T)


def test_palette_png_mask_keeps_indices(tmp_path):
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((6, 5), np.uint8)
    mask[2:4, 1:3] = 3
    pal = Image.fromarray(mask, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(tmp_path / "mask.png")
    image = load(ref_for_path(tmp_path / "img.png"))
    label = load_label(tmp_path / "mask.png", image, classes=[0, 3])
    assert np.array_equal(label.array[0], mask.T)


def test_tiff_with_one_series_per_page_is_one_stack(tmp_path):
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for k in range(3):
            tif.write(np.full((5, 7), k, np.uint8))
    found = discover(tmp_path)
    assert [s.kind for s in found.scans] == ["tiff"]
    scan = load(found.scans[0])
    assert scan.array.shape == (1, 7, 5, 3)
    assert [int(scan.array[0, 0, 0, k]) for k in range(3)] == [0, 1, 2]


def test_truncated_imagej_stack_is_reported(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (5, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", data, imagej=True, compression="zlib")
    raw = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "s.tif").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ScanError, match="s.tif"):
        load(ref_for_path(tmp_path / "s.tif"))


def test_single_frame_enhanced_uses_functional_groups(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    truth = phantoms.ct_phantom(shape=(40, 36, 1), oblique=(5.0, 10.0, 15.0))
    paths = phantoms.write_dicom_series(truth, tmp_path / "s")
    enhanced = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "one.dcm")
    scan = load(ref_for_path(tmp_path / "one.dcm"))
    assert np.abs(scan.geometry.affine[:3, :2] - truth.affine[:3, :2]).max() < 1e-4
    assert np.abs(scan.geometry.affine[:3, 3] - truth.affine[:3, 3]).max() < 1e-4
    assert np.array_equal(scan.array[0], truth.image)  # rescale from the functional groups


def _corrupt_all(tmp_path, **attrs):
    """A series whose every file carries the same malformed attribute(s)."""
    paths = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(8, 8, 3)), tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            tag = pydicom.datadict.tag_for_keyword(key)
            if value is None:
                del ds[tag]
            elif isinstance(value, str):  # stored as text, as a broken writer would
                ds[tag] = pydicom.DataElement(tag, "LO", value)
            else:
                setattr(ds, key, value)
        ds.save_as(path)
    return paths


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, "not two orthogonal unit vectors"),
        ({"RescaleSlope": "abc"}, "RescaleSlope is not a number"),
        ({"NumberOfFrames": "x"}, "NumberOfFrames is not an integer"),
        ({"Columns": None}, "Columns"),
    ],
)
def test_corrupt_headers_give_scan_errors(tmp_path, attrs, message):
    _corrupt_all(tmp_path, **attrs)
    found = discover(tmp_path / "s")
    reasons = [p.reason for p in found.problems]
    if found.scans:  # the problem only shows when the pixels are read
        with pytest.raises(ScanError, match=message):
            load(found.scans[0])
    else:
        assert any(message in r for r in reasons), reasons


def test_series_mixing_grey_and_rgb_is_reported(tmp_path):
    paths = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(8, 8, 3)), tmp_path / "s")
    ds = pydicom.dcmread(paths[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
    ds.save_as(paths[1])
    found = discover(tmp_path / "s")
    assert "colour channels" in found.problems[0].reason


def test_rgb24_and_big_endian_nifti(tmp_path):
    rgb = np.zeros((2, 3, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 7
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    scan = load(ref_for_path(tmp_path / "rgb.nii"))
    assert scan.array.shape == (3, 2, 3, 4) and int(scan.array[1].max()) == 7
    big = nib.Nifti1Image(np.arange(8, dtype=">i2").reshape(2, 2, 2), np.eye(4))
    nib.save(big, tmp_path / "be.nii")
    scan = load(ref_for_path(tmp_path / "be.nii"))
    assert scan.array.dtype.isnative and scan.array[0, 1, 1, 1] == 7


def test_id_suffix_never_takes_a_real_files_id(tmp_path):
    for name in ("x.png", "x_2.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    found = discover(tmp_path, stack_sequences=False)
    ids = {s.paths[0].name: s.id for s in found.scans}
    assert ids["x_2.png"] == "x_2"
    assert ids["x.png"] == "x" or ids["x.tif"] == "x"
    assert len(set(ids.values())) == 3


def test_decompression_bomb_is_a_scan_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ScanError, match="safety limit"):
        load(ref_for_path(tmp_path / "big.png"))


def test_monochrome1_is_inverted_to_read_like_monochrome2(tmp_path):
    truth = phantoms.ct_phantom(shape=(12, 10, 3), seed=2)
    grey = load(ref_for_path(phantoms.write_dicom_series(truth, tmp_path / "m2")[0].parent))
    paths = phantoms.write_dicom_series(truth, tmp_path / "m1")
    for path in paths:  # the same anatomy stored as a CR/DX would: white is the lowest value
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (4095 - ds.pixel_array).astype(np.uint16).tobytes()
        ds.save_as(path)
    scan = load(ref_for_path(tmp_path / "m1"))
    assert np.array_equal(scan.array, grey.array)
    assert any("MONOCHROME1 inverted" in n for n in scan.notes)
    assert np.array_equal(scan.geometry.affine, grey.geometry.affine)
    as_mask = load(ref_for_path(tmp_path / "m1"), LoadOptions(color="channels", palette="indices"))
    intercept = float(pydicom.dcmread(paths[0]).get("RescaleIntercept", 0))
    assert np.array_equal(as_mask.array, 4095 - (grey.array - intercept) + intercept)  # a mask keeps its stored values


def test_palette_colour_dicom_is_mapped_through_its_lookup_table():
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")  # ultrasound, 8-bit indices, 16-bit RGB LUT
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    scan = load(ref_for_path(path), LoadOptions(color="channels"))
    assert scan.array.shape == (3, ds.Columns, ds.Rows, 1)
    assert np.array_equal(scan.array[:, :, :, 0], np.transpose(rgb, (2, 1, 0)))
    assert any("palette" in n for n in scan.notes)
    grey = load(ref_for_path(path))
    assert grey.array.shape == (1, ds.Columns, ds.Rows, 1)
    assert len(np.unique(grey.array)) > 2  # a grey rendering, not the raw indices
    assert not np.array_equal(grey.array[0, :, :, 0], ds.pixel_array.T)
    as_mask = load(ref_for_path(path), LoadOptions(color="channels", palette="indices"))
    assert np.array_equal(as_mask.array[0, :, :, 0], ds.pixel_array.T)  # a mask keeps its class values


def test_palette_colour_without_its_table_names_the_file(tmp_path):
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    for name in ("RedPaletteColorLookupTableData", "RedPaletteColorLookupTableDescriptor"):
        del ds[name]
    ds.save_as(tmp_path / "nolut.dcm")
    with pytest.raises(ScanError, match="nolut.dcm") as info:
        load(ref_for_path(tmp_path / "nolut.dcm"))
    assert "lookup table" in str(info.value)
