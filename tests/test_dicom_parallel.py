"""DICOM slices decoded on a thread pool (medseg.ingest.dicom_pixels): the same bytes as one thread and as
stacking the decoded slices, in slice order, every failure a ScanError naming its file."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medseg.data import phantoms
from medseg.errors import ScanError
from medseg.ingest import LoadOptions, dicom_pixels, load, ref_for_path
from medseg.ingest import dicom as dicom_io
from medseg.ingest.dicom_series import plan_series
from medseg.ingest.dicom_pixels import default_workers, read_volume

THREADS = 4  # more than this machine's cores: the pool really interleaves


def _load(ref_or_path, workers: int, options: LoadOptions = LoadOptions(), monkeypatch=None):
    """load() with the pool forced to ``workers`` threads."""
    ref = ref_for_path(ref_or_path) if isinstance(ref_or_path, Path) else ref_or_path
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dicom_pixels, "default_workers", lambda *syntax: workers)
        return load(ref, options)


def _assert_same_bytes(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _stacked(folder: Path, options: LoadOptions = LoadOptions()) -> np.ndarray:
    """The reader before the pool: every slice decoded, np.stack, then the stack rescaled."""
    plan = plan_series(sorted(p for p in folder.iterdir() if p.is_file()))
    slices, params = [], []
    for path in plan.paths:
        ds = pydicom.dcmread(path)
        pixels, _ = dicom_io._as_displayed(path, ds, dicom_io._decode(path, ds), options)
        slices.append(np.transpose(pixels, (2, 1, 0)) if pixels.ndim == 3 else pixels.T[None])
        params.append((float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)))
    stack = np.stack(slices, axis=-1)
    p = np.asarray(params)
    if np.all(p[:, 0] == 1.0) and np.all(p[:, 1] == np.round(p[:, 1])):
        if np.all(p[:, 1] == 0):
            return stack
        out = stack.astype(np.int32) + p[:, 1].astype(np.int32)
        return out.astype(np.int16) if -(2**15) <= out.min() and out.max() < 2**15 else out
    return stack.astype(np.float32) * p[:, 0].astype(np.float32) + p[:, 1].astype(np.float32)


def _series(tmp_path: Path, syntax: str = "explicit", **kwargs) -> tuple[Path, phantoms.Phantom]:
    truth = phantoms.ct_phantom(shape=(40, 36, 12), seed=4)  # JPEG 2000 needs >= 32 px
    folder = tmp_path / syntax
    phantoms.write_dicom_series(truth, folder, order="shuffled", transfer_syntax=syntax, seed=7, **kwargs)
    return folder, truth


def _edit(paths, change) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


# --- the same voxels ---------------------------------------------------------------------


def test_threads_only_where_the_decoder_releases_the_gil():
    assert default_workers(JPEG2000Lossless) == default_workers(JPEG2000) == min(8, os.cpu_count() or 1)
    for syntax in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, None):
        assert default_workers(syntax) == 1


@pytest.mark.parametrize("syntax", ["explicit", "rle", "jpeg2000", "jpegls"])
def test_threads_give_the_bytes_of_one_thread_and_of_the_stack(tmp_path, monkeypatch, syntax):
    folder, truth = _series(tmp_path, syntax)
    threads = set()
    read = dicom_io._read_slice

    def spy(path, *args):
        threads.add(threading.current_thread().name)
        return read(path, *args)

    monkeypatch.setattr(dicom_io, "_read_slice", spy)
    parallel = _load(folder, THREADS)
    assert len(threads) > 1, "the pool did not run"
    one = _load(folder, 1)
    _assert_same_bytes(parallel.array, one.array)
    _assert_same_bytes(parallel.array, _stacked(folder))
    assert parallel.array.dtype == np.int16
    assert np.array_equal(parallel.array[0], truth.image)  # shuffled files, slices in spatial order
    assert parallel.metadata == one.metadata and parallel.notes == one.notes


@pytest.mark.parametrize(
    "change, dtype",
    [
        (None, np.float32),  # slope 0.3: float32, computed (and rounded) in float32
        (lambda ds: setattr(ds, "RescaleIntercept", "40000"), np.int32),  # beyond int16: int32
        (lambda ds: setattr(ds, "RescaleIntercept", "0"), np.uint16),  # no rescale: the stored dtype
    ],
)
def test_rescale_kinds_match_the_stack(tmp_path, change, dtype):
    folder, _ = _series(tmp_path, rescale_slope=0.3 if change is None else 1.0)
    if change is not None:
        _edit(sorted(folder.iterdir()), change)
    parallel, one = _load(folder, THREADS), _load(folder, 1)
    assert parallel.array.dtype == dtype
    _assert_same_bytes(parallel.array, one.array)
    _assert_same_bytes(parallel.array, _stacked(folder))


def test_intercepts_differing_per_slice(tmp_path):
    folder, _ = _series(tmp_path)
    files = sorted(folder.iterdir())
    _edit(files[::3], lambda ds: setattr(ds, "RescaleIntercept", "1000"))
    _assert_same_bytes(_load(folder, THREADS).array, _stacked(folder))
    _edit(files[1::3], lambda ds: setattr(ds, "RescaleIntercept", "-33000"))  # now below int16
    parallel = _load(folder, THREADS)
    assert parallel.array.dtype == np.int32
    _assert_same_bytes(parallel.array, _stacked(folder))


@pytest.mark.parametrize("intercept", ["-1024", "0"])
def test_slices_of_different_dtypes_promote_as_a_stack_would(tmp_path, intercept):
    folder, _ = _series(tmp_path)
    files = sorted(folder.iterdir())
    _edit(files, lambda ds: setattr(ds, "RescaleIntercept", intercept))
    _edit(files[5:6], lambda ds: setattr(ds, "PixelRepresentation", 1))  # one file signed: int16 + uint16 → int32
    parallel = _load(folder, THREADS)
    _assert_same_bytes(parallel.array, _stacked(folder))
    _assert_same_bytes(parallel.array, _load(folder, 1).array)
    assert parallel.array.dtype == (np.int32 if intercept == "0" else np.int16)


def test_monochrome1_series(tmp_path):
    folder, _ = _series(tmp_path)

    def invert(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (4095 - np.minimum(ds.pixel_array, 4095)).astype(np.uint16).tobytes()

    _edit(sorted(folder.iterdir()), invert)
    parallel, one = _load(folder, THREADS), _load(folder, 1)
    _assert_same_bytes(parallel.array, one.array)
    _assert_same_bytes(parallel.array, _stacked(folder))
    assert any("MONOCHROME1 inverted" in n for n in parallel.notes)


@pytest.mark.parametrize("options", [LoadOptions(), LoadOptions(color="channels"), LoadOptions(palette="indices")])
def test_palette_series(tmp_path, options):
    source = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    folder = tmp_path / "palette"
    folder.mkdir()
    for k in range(6):  # one ultrasound frame made a series: placed in space, its indices shifted per slice
        ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [0, 0, 2 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = ((source.pixel_array.astype(np.int32) + 17 * k) % 256).astype(np.uint8).tobytes()
        ds.save_as(folder / f"US{5 - k}.dcm")
    parallel, one = _load(folder, THREADS, options), _load(folder, 1, options)
    _assert_same_bytes(parallel.array, one.array)
    if options.color == "channels" or options.palette == "indices":  # no grey conversion after the stack
        _assert_same_bytes(parallel.array, _stacked(folder, options))
    assert parallel.array.shape[-1] == 6 and parallel.notes == one.notes


def test_enhanced_multiframe(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    truth = phantoms.ct_phantom(shape=(40, 36, 10), oblique=(10.0, 0.0, 20.0), seed=3)
    paths = phantoms.write_dicom_series(truth, tmp_path / "s")
    enhanced = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in reversed(paths)],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    out = tmp_path / "mf" / "enhanced.dcm"
    out.parent.mkdir()
    enhanced.save_as(out)
    parallel, one = _load(out, THREADS), _load(out, 1)
    _assert_same_bytes(parallel.array, one.array)
    assert np.array_equal(parallel.array[0], truth.image)  # frames stored in reverse, read in spatial order
    assert parallel.metadata["frame_order"] == one.metadata["frame_order"]


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm"])
@pytest.mark.parametrize("color", ["grey", "channels"])
def test_shipped_multiframe_files(name, color):
    path = Path(get_testdata_file(name))
    options = LoadOptions(color=color)
    parallel, one = _load(path, THREADS, options), _load(path, 1, options)
    _assert_same_bytes(parallel.array, one.array)
    if color == "channels":
        frames = pydicom.dcmread(path).pixel_array  # (frames, rows, columns, samples)
        _assert_same_bytes(parallel.array, np.ascontiguousarray(np.transpose(frames, (3, 2, 1, 0))))


# --- failures ----------------------------------------------------------------------------


def _break_jpeg2000(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])  # a codestream header, then nothing
    ds.save_as(path)


def test_a_slice_that_fails_to_decode_names_its_file(tmp_path):
    folder, _ = _series(tmp_path, "jpeg2000")
    order = plan_series(sorted(folder.iterdir())).paths
    _break_jpeg2000(order[7])
    with pytest.raises(ScanError) as caught:
        _load(folder, THREADS)
    assert caught.value.paths == [order[7]]
    assert "cannot decode pixel data" in caught.value.problem


def test_the_first_failing_slice_in_order_is_reported(tmp_path):
    folder, _ = _series(tmp_path, "jpeg2000")
    order = plan_series(sorted(folder.iterdir())).paths
    for k in (3, 9):
        _break_jpeg2000(order[k])
    for _ in range(3):
        with pytest.raises(ScanError) as caught:
            _load(folder, THREADS)
        assert caught.value.paths == [order[3]]


def test_an_unexpected_error_in_a_worker_becomes_a_scan_error(tmp_path, monkeypatch):
    folder, _ = _series(tmp_path)
    bad = plan_series(sorted(folder.iterdir())).paths[6]
    read = dicom_io._read_slice

    def failing(path, *args):
        if path == bad:
            raise RuntimeError("decoder crashed")
        return read(path, *args)

    monkeypatch.setattr(dicom_io, "_read_slice", failing)
    with pytest.raises(ScanError) as caught:
        _load(folder, THREADS)
    assert caught.value.paths == [bad]
    assert "decoder crashed" in caught.value.problem
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_memory_running_out_in_a_worker_is_reported_for_the_scan(tmp_path, monkeypatch):
    folder, _ = _series(tmp_path)
    bad = plan_series(sorted(folder.iterdir())).paths[4]
    read = dicom_io._read_slice

    def failing(path, *args):
        if path == bad:
            raise MemoryError()
        return read(path, *args)

    monkeypatch.setattr(dicom_io, "_read_slice", failing)
    with pytest.raises(ScanError, match="too large to load into memory"):
        _load(folder, THREADS)


def test_a_truncated_file_among_many_is_named(tmp_path):
    folder, _ = _series(tmp_path)
    victim = plan_series(sorted(folder.iterdir())).paths[8]
    victim.write_bytes(victim.read_bytes()[:-500])
    with pytest.raises(ScanError, match="truncated") as caught:
        _load(folder, THREADS)
    assert caught.value.paths == [victim]


def test_a_decoded_slice_of_another_size_is_a_scan_error(tmp_path):
    folder, _ = _series(tmp_path, "jpeg2000")
    order = plan_series(sorted(folder.iterdir())).paths
    other = phantoms.ct_phantom(shape=(48, 36, 1), seed=1)  # the header says 40 columns, the codestream 48
    phantoms.write_dicom_series(other, tmp_path / "other", transfer_syntax="jpeg2000")
    ds = pydicom.dcmread(order[2])
    ds.PixelData = pydicom.dcmread(next((tmp_path / "other").iterdir())).PixelData
    ds.save_as(order[2])
    with pytest.raises(ScanError) as caught:
        _load(folder, THREADS)
    assert caught.value.paths == [order[2]]


# --- the pool itself ---------------------------------------------------------------------


def test_slices_finishing_out_of_order_land_in_their_place():
    count = 16

    def decode(k):
        time.sleep(0.002 * (count - k))  # the last slices finish first
        return np.full((3, 5), k, dtype=np.uint16), None

    volume, notes = read_volume(decode, [Path(f"s{k}") for k in range(count)], [(1.0, 0.0)] * count, 1, workers=THREADS)
    assert volume.shape == (1, 5, 3, count)
    assert [int(volume[0, 0, 0, k]) for k in range(count)] == list(range(count))
    assert notes == {None}


@pytest.mark.parametrize("first, other, samples, bad", [((3, 5), (3, 6), 1, 2), ((3, 5), (3, 5, 3), 1, 0)])
def test_slices_that_do_not_fit_the_volume_name_their_file(first, other, samples, bad):
    paths = [Path(f"s{k}") for k in range(6)]

    def decode(k):
        return np.zeros(other if k == bad else first, dtype=np.uint16), None

    with pytest.raises(ScanError, match="decoded pixel data has shape") as caught:
        read_volume(decode, paths, [(1.0, -1024.0)] * 6, samples, workers=THREADS)
    assert caught.value.paths == [paths[bad]]


def test_warning_filters_are_left_as_they_were(tmp_path):
    folder, _ = _series(tmp_path)
    before = list(warnings.filters)
    for _ in range(3):
        _load(folder, THREADS)
    assert warnings.filters == before


def test_a_single_file_needs_no_pool(tmp_path):
    src = Path(get_testdata_file("CT_small.dcm"))
    copy = tmp_path / "ct.dcm"
    shutil.copy(src, copy)
    _assert_same_bytes(_load(copy, THREADS).array, _load(copy, 1).array)


# --- JPEG 2000 through imagecodecs, JPEG-LS through pyjpegls; each header parsed once -----


def _dataset(arr: np.ndarray, bits: int, signed: bool) -> Dataset:
    """A native secondary-capture dataset holding ``arr`` (rows, columns[, 3]), ready to compress."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if bits <= 8 else 16 if bits <= 16 else 32), bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.tobytes()
    return ds


def _values(bits: int, signed: bool, shape=(64, 48), seed: int = 0) -> np.ndarray:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    dtype = ("i" if signed else "u") + ("1" if bits <= 8 else "2" if bits <= 16 else "4")
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(dtype)


def _both(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(pydicom's pylibjpeg-openjpeg decode, the imagecodecs plugin's decode) of ``ds``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pixel_array(ds, decoding_plugin="pylibjpeg"), pixel_array(ds, decoding_plugin=dicom_pixels.PLUGIN)


@pytest.mark.parametrize("syntax, options", [(JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [15]})])
@pytest.mark.parametrize("bits, signed", [(8, False), (8, True), (12, False), (12, True), (16, False), (16, True)])
def test_imagecodecs_jpeg2000_gives_pydicoms_bytes(syntax, options, bits, signed):
    values = _values(bits, signed)
    ds = _dataset(values, bits, signed)
    ds.compress(syntax, values, encoding_plugin="pylibjpeg", **options)
    theirs, ours = _both(ds)
    _assert_same_bytes(ours, theirs)
    if syntax == JPEG2000Lossless:
        _assert_same_bytes(ours, values)


@pytest.mark.parametrize(
    "photometric, syntax, options",
    [("YBR_RCT", JPEG2000Lossless, {}), ("YBR_ICT", JPEG2000, {"j2k_cr": [15]}), ("RGB", JPEG2000Lossless, {})],
)
def test_imagecodecs_jpeg2000_colour_gives_pydicoms_bytes(photometric, syntax, options):
    rgb = _values(8, False, (64, 48, 3), seed=1)
    ds = _dataset(rgb, 8, False)
    ds.compress(syntax, rgb, encoding_plugin="pylibjpeg", **options)  # the codestream's component transform on
    ds.PhotometricInterpretation = photometric
    theirs, ours = _both(ds)
    _assert_same_bytes(ours, theirs)
    assert ours.shape == (64, 48, 3)
    if syntax == JPEG2000Lossless:
        _assert_same_bytes(ours, rgb)


def test_imagecodecs_jpeg2000_multiframe_and_sign_correction():
    frames = _values(12, False, (3, 64, 48), seed=2)
    ds = _dataset(frames[0], 12, False)
    ds.NumberOfFrames, ds.PixelData = 3, frames.tobytes()
    ds.compress(JPEG2000Lossless, frames, encoding_plugin="pylibjpeg")
    theirs, ours = _both(ds)
    _assert_same_bytes(ours, theirs)
    _assert_same_bytes(ours, frames)
    ds.PixelRepresentation = 1  # the header says signed, the codestream unsigned: pydicom sign-extends 12 bits
    theirs, ours = _both(ds)
    _assert_same_bytes(ours, theirs)
    assert ours.dtype == np.int16 and ours.min() < 0


@pytest.mark.parametrize("bits, signed", [(8, False), (12, False), (16, True)])
def test_imagecodecs_htj2k_gives_pydicoms_bytes(bits, signed):
    imagecodecs = pytest.importorskip("imagecodecs")
    values = _values(bits, signed, seed=3)
    ds = _dataset(values, bits, signed)
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(values)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    theirs, ours = _both(ds)
    _assert_same_bytes(ours, theirs)
    _assert_same_bytes(ours, values)


def test_an_unsupported_jpeg2000_header_falls_back_to_pydicom(tmp_path):
    values = _values(20, False, seed=4)  # precision 20: left to pydicom's own plugins
    ds = _dataset(values, 20, False)
    ds.compress(JPEG2000Lossless, values, encoding_plugin="pylibjpeg")
    with pytest.raises(RuntimeError, match="left to pydicom"):
        pixel_array(ds, decoding_plugin=dicom_pixels.PLUGIN)
    _assert_same_bytes(dicom_io._decode(tmp_path / "x.dcm", ds), values)
    path = tmp_path / "deep.dcm"
    ds.save_as(path, enforce_file_format=True)
    _assert_same_bytes(load(ref_for_path(path)).array[0, :, :, 0], values.T)


def test_a_jpeg2000_series_loads_as_pylibjpeg_decodes_it(tmp_path):
    folder, truth = _series(tmp_path, "jpeg2000")
    order = plan_series(sorted(folder.iterdir())).paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = np.stack([pixel_array(str(p), decoding_plugin="pylibjpeg") for p in order], axis=-1)
    intercept = int(pydicom.dcmread(order[0]).RescaleIntercept)
    scan = _load(folder, THREADS)
    _assert_same_bytes(scan.array[0], (stack.astype(np.int32) + intercept).astype(np.int16).transpose(1, 0, 2))
    assert np.array_equal(scan.array[0], truth.image)


def test_jpegls_is_decoded_by_pyjpegls_with_pydicoms_bytes(tmp_path):
    assert dicom_pixels.preferred_plugin(JPEGLSLossless) == "pyjpegls"
    folder, _ = _series(tmp_path, "jpegls")
    for path in sorted(folder.iterdir())[:3]:
        ds = pydicom.dcmread(path)
        _assert_same_bytes(pixel_array(ds, decoding_plugin="pyjpegls"), pixel_array(ds, decoding_plugin="pylibjpeg"))


@pytest.mark.parametrize("syntax", ["explicit", "jpeg2000"])
def test_each_file_is_parsed_once(tmp_path, monkeypatch, syntax):
    folder, truth = _series(tmp_path, syntax)
    ref = ref_for_path(folder)
    reads = []
    dcmread = pydicom.dcmread

    def counting(*args, **kwargs):
        reads.append(args[0])
        return dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    scan = _load(ref, THREADS)
    assert len(reads) == len(ref.paths) == truth.image.shape[2]
    assert np.array_equal(scan.array[0], truth.image)
