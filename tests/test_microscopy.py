"""Microscopy ingestion: TIFF stacks with pixel sizes, PNG images and numbered sequences."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.data import phantoms
from medseg.errors import ScanError
from medseg.ingest import LoadOptions, ScanRef, discover, load, ref_for_path


def test_imagej_tiff_stack_keeps_pixel_size_and_axes(tmp_path):
    em = phantoms.em_phantom(shape=(40, 30, 6))
    path = phantoms.write_tiff_stack(em.image, em.affine, tmp_path / "stack.tif")
    scan = load(ref_for_path(path))
    assert scan.array.shape == (1, 40, 30, 6)  # (C, x, y, z)
    assert np.array_equal(scan.array[0], em.image)
    assert np.allclose(scan.geometry.spacing, (4e-6, 4e-6, 5e-5))
    assert scan.geometry.spacing_known
    assert np.array_equal(tifffile.imread(path)[2], em.image[:, :, 2].T)  # file stays (z, y, x)


def test_tiff_resolution_tags_without_imagej(tmp_path):
    data = np.arange(12 * 10, dtype=np.uint16).reshape(10, 12)  # (y, x)
    tifffile.imwrite(tmp_path / "plain.tif", data, resolution=(200.0, 100.0), resolutionunit="CENTIMETER")
    scan = load(ref_for_path(tmp_path / "plain.tif"))
    assert scan.array.shape == (1, 12, 10)
    assert np.allclose(scan.geometry.spacing, (10.0 / 200.0, 10.0 / 100.0))
    assert np.array_equal(scan.array[0], data.T)


def test_ome_tiff_pixel_size_comes_from_its_ome_xml(tmp_path):
    data = np.arange(3 * 8 * 9, dtype=np.uint16).reshape(3, 8, 9)  # (z, y, x)
    tifffile.imwrite(  # as Bio-Formats writes it: sizes in the XML, no resolution tags
        tmp_path / "cells.ome.tif",
        data,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeY": 0.25,
            "PhysicalSizeYUnit": "\u00b5m",
            "PhysicalSizeZ": 200.0,
            "PhysicalSizeZUnit": "nm",
        },
    )
    scan = load(ref_for_path(tmp_path / "cells.ome.tif"))
    assert scan.geometry.spacing_known
    assert np.allclose(scan.geometry.spacing, (0.5e-3, 0.25e-3, 200e-6))  # mm; OME's default unit is µm
    assert np.array_equal(scan.array[0], np.transpose(data, (2, 1, 0)))


def test_ome_tiff_without_physical_size_is_unknown(tmp_path):
    tifffile.imwrite(tmp_path / "bare.ome.tif", np.zeros((2, 8, 9), np.uint8), ome=True, metadata={"axes": "ZYX"})
    scan = load(ref_for_path(tmp_path / "bare.ome.tif"))
    assert not scan.geometry.spacing_known
    assert any("no pixel size" in n for n in scan.notes)


def test_tiff_without_pixel_size_notes_it(tmp_path):
    tifffile.imwrite(tmp_path / "bare.tif", np.zeros((3, 8, 9), np.uint8), photometric="minisblack")
    scan = load(ref_for_path(tmp_path / "bare.tif"))
    assert scan.array.shape == (1, 9, 8, 3)
    assert not scan.geometry.spacing_known
    assert any("no pixel size" in n for n in scan.notes)


def test_rgb_tiff_to_grey_or_channels(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    ref = ref_for_path(tmp_path / "rgb.tif")
    grey = load(ref)
    assert grey.array.shape == (1, 12, 10)
    assert np.allclose(grey.array, 200 * 0.2125, atol=1e-3)
    channels = load(ref, LoadOptions(color="channels"))
    assert channels.array.shape == (3, 12, 10)
    assert np.all(channels.array[0] == 200) and np.all(channels.array[1] == 0)


def test_png_sequence_is_one_stack_in_natural_order(tmp_path):
    stack = np.zeros((8, 6, 12), np.uint8)
    for k in range(12):
        stack[..., k] = k * 10
    phantoms.write_png_sequence(stack, tmp_path / "seq")
    found = discover(tmp_path / "seq")
    assert len(found.scans) == 1 and found.scans[0].kind == "image-sequence"
    assert [p.name for p in found.scans[0].paths][:3] == ["0.png", "1.png", "2.png"]
    assert found.scans[0].paths[10].name == "10.png"
    scan = load(found.scans[0])
    assert scan.array.shape == (1, 8, 6, 12)
    assert [int(scan.array[0, 0, 0, k]) for k in range(12)] == [k * 10 for k in range(12)]
    separate = discover(tmp_path / "seq", stack_sequences=False)
    assert len(separate.scans) == 12 and separate.scans[2].id == "2"


def test_single_png_rgba_and_palette(tmp_path):
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 1] = 100
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    scan = load(ref_for_path(tmp_path / "a.png"), LoadOptions(color="channels"))
    assert scan.array.shape == (3, 7, 5)
    assert "alpha channel dropped" in scan.notes
    Image.fromarray(np.zeros((5, 7), np.uint8)).convert("P").save(tmp_path / "p.png")
    assert load(ref_for_path(tmp_path / "p.png")).array.shape == (1, 7, 5)


def test_png_dpi_gives_pixel_size(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d.png", dpi=(254, 254))
    scan = load(ref_for_path(tmp_path / "d.png"))
    assert scan.geometry.spacing_known
    assert np.allclose(scan.geometry.spacing, (0.1, 0.1), atol=1e-4)


def test_sequence_with_mixed_sizes_is_reported(tmp_path):
    (tmp_path / "seq").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "seq" / "0.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "seq" / "1.png")
    with pytest.raises(ScanError, match="mixes sizes"):
        load(ScanRef("seq", "image-sequence", tuple(sorted((tmp_path / "seq").iterdir()))))


def test_corrupt_png_is_reported(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match="x.png"):
        load(ref_for_path(tmp_path / "x.png"))
