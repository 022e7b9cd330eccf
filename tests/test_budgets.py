"""Budgets before bytes: hostile files that declare far more pixels than they hold are refused from
their headers, before decoding, with an error naming the file, the size and the setting to raise.

Every bomb here is a valid file of a few hundred kilobytes or less on disk that expands to
hundreds of megabytes (or gigabytes) when decoded. The subprocess tests measure the peak
RSS of a fresh interpreter that tries to load one: refusal must cost under ~100 MB and a
few seconds (before the budget, these took 2-8.5 GB and up to 33 s).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import Orientationd, Spacingd
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medseg.data import phantoms
from medseg.cli import main
from medseg.errors import ConfigError, ScanError
from medseg.geometry import Geometry
from medseg.ingest import LoadOptions, ScanRef, load, ref_for_path
from medseg.ingest import budget as budget_module
from medseg.ingest.budget import (
    DEFAULT_CAP_MB,
    MIN_DEFAULT_MB,
    BudgetError,
    check_budget,
    check_resample_budget,
    default_budget_mb,
    resampled_shape,
)

REPO = Path(__file__).resolve().parents[1]

# --- builders: each writes one small file that declares a huge image ---------------------


def _zeros_deflated(nbytes: int, wbits: int = zlib.MAX_WBITS) -> bytes:
    """A deflate stream of ``nbytes`` zero bytes, built in 1 MB steps (never holding the zeros)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = bytes(1 << 20)
    parts = []
    for start in range(0, nbytes, len(chunk)):
        parts.append(comp.compress(chunk[: min(len(chunk), nbytes - start)]))
    parts.append(comp.flush())
    return b"".join(parts)


def write_nifti_gzip_bomb(path: Path, shape: tuple[int, ...], dtype: type = np.uint8) -> Path:
    """A .nii.gz whose header declares ``shape`` and whose gzip stream holds exactly that many zeros."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = bytes(1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as fh:  # streamed: the zeros are never held whole
        fh.write(header.binaryblock + b"\0" * 4)  # 4 bytes: no extensions, voxels from byte 352
        for start in range(0, nbytes, len(chunk)):
            fh.write(chunk[: min(len(chunk), nbytes - start)])
    return path


def write_nifti_with_dims(path: Path, dims: tuple[int, int, int]) -> Path:
    """A 4x4x4 NIfTI-1 whose dim[1..3] fields are overwritten with ``dims`` as 16-bit two's complement.

    A writer that puts 40000 into the signed 16-bit field stores -25536: the file a user gets
    from a tool that does not check.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    for axis, value in enumerate(dims):
        raw[42 + 2 * axis : 44 + 2 * axis] = struct.pack("<H", value & 0xFFFF)
    path.write_bytes(bytes(raw))
    return path


def _seed_dataset(root: Path) -> pydicom.Dataset:
    """A complete CT header (one slice of the phantom) to turn into a hostile file."""
    path = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(8, 8, 1)), root / "_seed")[0]
    return pydicom.dcmread(path)


def _rle_frame(segments: int) -> bytes:
    """One RLE frame whose every segment is a single run of 128 zeros (RLE header: 16 uint32)."""
    segment = b"\x81\x00"
    offsets = [64 + k * len(segment) for k in range(segments)]
    header = struct.pack("<16I", segments, *offsets, *([0] * (15 - segments)))
    return header + segment * segments


def write_rle_dicom(
    path: Path, rows: int, cols: int, *, frames: int = 1, stored_frames: int = 1, bits: int = 16, samples: int = 1
) -> Path:
    """An RLE Lossless DICOM declaring rows x cols (x frames) whose segments hold a few bytes each."""
    ds = _seed_dataset(path.parent.parent / f"seed_{path.stem}")
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([_rle_frame(samples * bits // 8)] * stored_frames)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_native_multiframe(path: Path, frames: int, stored_frames: int = 2) -> Path:
    """An uncompressed 64x64 16-bit multi-frame DICOM declaring ``frames`` frames, holding ``stored_frames``."""
    ds = _seed_dataset(path.parent.parent / f"seed_{path.stem}")
    ds.Rows = ds.Columns = 64
    ds.NumberOfFrames = frames
    ds.PixelData = np.zeros((stored_frames, 64, 64), np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_deflate_tiff(path: Path, width: int, height: int, pages: int = 1, bits: int = 8) -> Path:
    """A classic TIFF of ``pages`` zlib-compressed zero pages, one strip each, built tag by tag."""
    strip = _zeros_deflated(width * height * bits // 8)
    data_start = 8
    ifd_start = data_start + len(strip)  # every page shares the one strip of zeros
    entries = 10
    ifd_size = 2 + entries * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_start))
    out += strip
    for page in range(pages):
        here = ifd_start + page * ifd_size
        following = here + ifd_size if page + 1 < pages else 0

        def short(tag: int, value: int) -> bytes:
            return struct.pack("<HHIHH", tag, 3, 1, value, 0)

        def long(tag: int, value: int) -> bytes:
            return struct.pack("<HHII", tag, 4, 1, value)

        out += struct.pack("<H", entries)
        out += long(256, width) + long(257, height) + short(258, bits) + short(259, 8) + short(262, 1)
        out += long(273, data_start) + short(277, 1) + long(278, height) + long(279, len(strip)) + short(284, 1)
        out += struct.pack("<I", following)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int, height: int, color_type: int = 6, bit_depth: int = 8) -> Path:
    """A valid PNG of width x height zero pixels (every row: filter byte 0 + zero samples)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes(1 + width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join([comp.compress(row) for _ in range(height)] + [comp.flush()])
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


# --- the bombs: each must be refused before decoding -------------------------------------


@dataclass(frozen=True)
class Bomb:
    name: str
    build: Callable[[Path], Path]
    budget_mb: float | None  # None: the default budget (from available memory)
    declared: int  # bytes the header declares once decoded
    message: str  # a fragment the refusal names (the size)


BOMBS = [
    Bomb(
        "gzip NIfTI 1024x1024x512 uint8",
        lambda r: write_nifti_gzip_bomb(r / "bomb.nii.gz", (1024, 1024, 512)),
        64,
        1024 * 1024 * 512,
        "537 MB",
    ),
    Bomb(
        "RLE DICOM 65535x65535 16-bit",
        lambda r: write_rle_dicom(r / "ct" / "bomb.dcm", 65535, 65535),
        None,
        65535 * 65535 * 2,
        "8.59 GB",
    ),
    Bomb(
        "RLE multi-frame 4096x4096 x 3000 frames",
        lambda r: write_rle_dicom(r / "ct" / "bomb.dcm", 4096, 4096, frames=3000, stored_frames=3000),
        None,
        4096 * 4096 * 2 * 3000,
        "101 GB",
    ),
    Bomb(
        "zlib TIFF 20000x20000 uint8",
        lambda r: write_deflate_tiff(r / "bomb.tif", 20000, 20000),
        64,
        20000 * 20000,
        "400 MB",
    ),
    Bomb(
        "PNG 9000x9000 RGBA (just under Pillow's limit)",
        lambda r: write_png_bomb(r / "bomb.png", 9000, 9000),
        64,
        9000 * 9000 * 4,
        "324 MB",
    ),
]

_PROBE = r"""
import json, resource, sys, time
from pathlib import Path

from medseg.errors import MedsegError
from medseg.ingest import LoadOptions, load, ref_for_path


def status_kb(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


path, budget = Path(sys.argv[1]), None if sys.argv[2] == "default" else float(sys.argv[2])
# A child started by exec inherits its parent's peak in ru_maxrss (here: pytest's, with torch loaded),
# which would hide anything smaller. Writing 5 to clear_refs resets this process's own peak (VmHWM,
# the per-process part of ru_maxrss) to its RSS now, so the peak after the load is the load's.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status_kb("VmRSS:")
start = time.perf_counter()
try:
    load(ref_for_path(path), LoadOptions(memory_budget_mb=budget))
    outcome = {"error": None, "message": ""}
except MedsegError as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc), "nbytes": getattr(exc, "nbytes", None)}
outcome["seconds"] = time.perf_counter() - start
outcome["peak_rss_increase_mb"] = (status_kb("VmHWM:") - before) / 1024
outcome["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(outcome))
"""


def probe_load(path: Path, budget_mb: float | None) -> dict:
    """Load ``path`` in a fresh interpreter: its error, seconds taken and peak RSS above the RSS before loading (MB)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), "default" if budget_mb is None else str(budget_mb)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


pytestmark_linux = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset and read in /proc"
)


@pytestmark_linux
def test_probe_sees_what_a_load_allocates(tmp_path):
    """The measurement can fail: a 134 MB volume loaded within its budget shows up in the probe's figure."""
    path = write_nifti_gzip_bomb(tmp_path / "ok.nii.gz", (1024, 1024, 128))
    outcome = probe_load(path, 1000)
    assert outcome["error"] is None, outcome
    assert outcome["peak_rss_increase_mb"] > 120, outcome


@pytestmark_linux
@pytest.mark.parametrize("bomb", BOMBS, ids=[b.name for b in BOMBS])
def test_bomb_is_refused_from_its_header_before_decoding(bomb: Bomb, tmp_path):
    path = bomb.build(tmp_path)
    assert path.stat().st_size < 1_000_000, "a bomb must be small on disk"
    outcome = probe_load(path, bomb.budget_mb)
    print(
        f"{bomb.name}: {path.stat().st_size / 1e3:.1f} KB on disk, peak RSS +{outcome['peak_rss_increase_mb']:.1f} MB, "
        f"{outcome['seconds']:.2f} s"
    )
    assert outcome["error"] == "BudgetError", outcome
    assert outcome["nbytes"] == bomb.declared
    message = outcome["message"]
    assert path.name in message and bomb.message in message and "memory budget" in message, message
    assert "--memory-budget" in message, message
    assert outcome["peak_rss_increase_mb"] < 100, outcome
    assert outcome["seconds"] < 5, outcome


# --- more instances of each class, in-process ---------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, budget_mb",
    [((512, 512, 256), np.uint8, 32), ((256, 256, 256), np.int16, 16), ((128, 128, 128, 8), np.float32, 50)],
)
def test_gzip_nifti_over_budget_is_refused(tmp_path, shape, dtype, budget_mb):
    path = write_nifti_gzip_bomb(tmp_path / "v.nii.gz", shape, dtype)
    declared = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(path), LoadOptions(memory_budget_mb=budget_mb))
    assert info.value.nbytes == declared and info.value.budget_bytes == budget_mb * 10**6
    assert str(path) in str(info.value) and f"at least {-(-declared // 10**6)} MB" in str(info.value)
    # the same file loads when the budget allows it: the refusal is the budget's, not a broken file's
    scan = load(ref_for_path(path), LoadOptions(memory_budget_mb=declared / 1e6 + 1))
    assert scan.array.size == int(np.prod(shape))


@pytest.mark.parametrize(
    "dims, shown",
    [((40000, 4, 4), "dim[1] is -25536"), ((4, 65535, 4), "dim[2] is -1"), ((4, 4, 32768), "dim[3] is -32768")],
)
def test_nifti1_dims_that_overflow_int16_are_named(tmp_path, dims, shown):
    path = write_nifti_with_dims(tmp_path / "wide.nii", dims)
    with pytest.raises(ScanError) as info:
        load(ref_for_path(path))
    message = str(info.value)
    assert "wide.nii" in message and shown in message and "NIfTI-2" in message, message
    assert not isinstance(info.value.__cause__, OverflowError)


@pytest.mark.parametrize(
    "rows, cols, bits, samples, text",
    [(65535, 65535, 8, 1, "4.29 GB"), (40000, 40000, 8, 3, "4.8 GB"), (65535, 32768, 16, 1, "4.29 GB")],
)
def test_rle_dicom_declaring_a_giant_frame_is_refused(tmp_path, rows, cols, bits, samples, text):
    path = write_rle_dicom(tmp_path / "ct" / "big.dcm", rows, cols, bits=bits, samples=samples)
    assert path.stat().st_size < 5000
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(path), LoadOptions(color="channels"))
    assert info.value.nbytes == rows * cols * samples * bits // 8
    assert "big.dcm" in str(info.value) and text in str(info.value), str(info.value)


def test_huge_number_of_frames_in_a_compressed_file_is_refused_by_file_size(tmp_path):
    path = write_rle_dicom(tmp_path / "ct" / "frames.dcm", 512, 512, frames=2**31 - 1)
    with pytest.raises(ScanError) as info:
        load(ref_for_path(path))
    message = str(info.value)
    assert "frames.dcm" in message and "NumberOfFrames 2147483647" in message and "can hold" in message, message


@pytest.mark.parametrize("frames", [10**6, 2**31 - 1])
def test_huge_number_of_frames_in_a_native_file_is_refused_before_planning(tmp_path, frames):
    path = write_native_multiframe(tmp_path / "ct" / "mf.dcm", frames)
    ref = ScanRef("mf", "dicom", (path,))  # straight to the reader, past discovery's truncation check
    with pytest.raises(ScanError) as info:
        load(ref)
    message = str(info.value)
    assert "mf.dcm" in message and f"NumberOfFrames {frames}" in message and "at most 2" in message, message


@pytest.mark.parametrize("frames", [0, -5])
def test_number_of_frames_below_one_is_refused(tmp_path, frames):
    path = write_native_multiframe(tmp_path / "ct" / "mf.dcm", 2)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.save_as(path)
    with pytest.raises(ScanError, match=rf"mf.dcm: NumberOfFrames is {frames}"):
        load(ScanRef("mf", "dicom", (path,)))


@pytest.mark.parametrize("width, height, pages, bits, budget_mb", [(12000, 12000, 1, 8, 100), (4000, 4000, 6, 16, 150)])
def test_zlib_tiff_over_budget_is_refused(tmp_path, width, height, pages, bits, budget_mb):
    path = write_deflate_tiff(tmp_path / "z.tif", width, height, pages=pages, bits=bits)
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(path), LoadOptions(memory_budget_mb=budget_mb))
    assert info.value.nbytes == width * height * pages * bits // 8
    assert "z.tif" in str(info.value) and "TIFF image data" in str(info.value)


def test_deflate_tiff_builder_writes_a_readable_tiff(tmp_path):
    path = write_deflate_tiff(tmp_path / "small.tif", 40, 30, pages=3, bits=16)
    scan = load(ref_for_path(path))
    assert scan.array.shape == (1, 40, 30, 3) and scan.array.dtype == np.uint16 and not scan.array.any()


@pytest.mark.parametrize(
    "width, height, color_type, bit_depth, per_pixel",
    [(9400, 9400, 0, 16, 2), (9000, 9000, 2, 8, 3), (6000, 6000, 4, 8, 2)],
)
def test_png_near_pillows_limit_is_refused_within_it(tmp_path, width, height, color_type, bit_depth, per_pixel):
    assert width * height <= Image.MAX_IMAGE_PIXELS  # Pillow's own guard would let these through
    path = write_png_bomb(tmp_path / "p.png", width, height, color_type, bit_depth)
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(path), LoadOptions(memory_budget_mb=32))
    assert info.value.nbytes == width * height * per_pixel
    assert "p.png" in str(info.value) and f"{width} x {height}" in str(info.value)


def test_image_sequence_is_refused_before_its_other_planes_are_read(tmp_path, monkeypatch):
    for k in range(3):
        Image.fromarray(np.zeros((2000, 1000), np.uint8)).save(tmp_path / f"s{k}.png")  # 2 MB each
    reads = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: reads.append(Path(fp).name) or real_open(fp, *a, **kw))
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(tmp_path), LoadOptions(memory_budget_mb=5))
    assert info.value.nbytes == 3 * 2000 * 1000 and "stack of 3 images" in str(info.value)
    assert reads == ["s0.png"]  # one plane read, the other two never opened


@pytest.mark.parametrize("kind", ["nifti", "dicom", "tiff", "png-rgb", "png-palette", "png-16bit"])
def test_declared_size_is_the_decoded_size(tmp_path, kind):
    """The size checked from the header equals what decoding produces, so the budget means what it says."""
    if kind == "nifti":
        path = phantoms.write_nifti(np.zeros((20, 12, 5), np.int16), np.eye(4), tmp_path / "v.nii.gz")
    elif kind == "dicom":
        path = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(12, 10, 4)), tmp_path / "ct")[0].parent
    elif kind == "tiff":
        tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 16, 24), np.uint16), photometric="minisblack")
        path = tmp_path / "s.tif"
    elif kind == "png-rgb":
        Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "c.png")
        path = tmp_path / "c.png"
    elif kind == "png-palette":
        Image.fromarray(np.zeros((10, 20), np.uint8)).convert("P").save(tmp_path / "p.png")
        path = tmp_path / "p.png"
    else:
        Image.fromarray(np.zeros((10, 20), np.uint16)).save(tmp_path / "w.png")
        path = tmp_path / "w.png"
    with pytest.raises(BudgetError) as info:
        load(ref_for_path(path), LoadOptions(memory_budget_mb=1e-6))
    declared = info.value.nbytes
    exact = load(
        ref_for_path(path), LoadOptions(color="channels", memory_budget_mb=declared / 1e6)
    )  # at the budget: loads
    stored_channels = {"png-rgb": 3, "png-palette": 3}.get(kind, 1)
    decoded_itemsize = 2 if kind in ("nifti", "dicom", "tiff", "png-16bit") else 1
    assert declared == exact.array[0].size * stored_channels * decoded_itemsize
    with pytest.raises(BudgetError):
        load(ref_for_path(path), LoadOptions(memory_budget_mb=(declared - 1) / 1e6))


# --- resampling to the model's spacing ---------------------------------------------------


@pytest.mark.parametrize(
    "shape, spacing, target, orientation",
    [
        ((64, 64, 64), (50.0, 50.0, 50.0), (0.5, 0.5, 0.5), None),  # a header in cm read as mm... times 100
        ((512, 512, 300), (0.7, 0.7, 1.0), (0.01, 0.01, 0.01), "RAS"),  # a model spacing in metres
        ((400, 300, 200), (1000.0, 1.0, 1.0), (1.0, 1.0, 1.0), "LPS"),
    ],  # one corrupt PixelSpacing value
)
def test_resampling_explosion_is_refused_before_resampling(tmp_path, shape, spacing, target, orientation):
    geometry = Geometry.from_spacing(shape, spacing)
    with pytest.raises(BudgetError) as info:
        check_resample_budget(tmp_path / "scan.nii.gz", geometry, target, orientation=orientation, budget=1024)
    message = str(info.value)
    assert (
        "scan.nii.gz" in message and "resampling from voxel size" in message and "memory budget of 1.02 GB" in message
    )
    expected = np.prod([np.round((n - 1) * s / t) + 1 for n, s, t in zip(shape, spacing, target)]) * 4
    assert info.value.nbytes == int(expected)


def test_resampled_shape_matches_monai_orientation_then_spacing():
    """The estimate is the shape MONAI's own Orientationd + Spacingd produce, so it guards what runs."""
    rotate = np.array([[0.0, 0.0, -2.5, 10.0], [-0.8, 0.0, 0.0, 5.0], [0.0, 1.2, 0.0, -3.0], [0, 0, 0, 1]])
    shape = (23, 17, 11)
    image = MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(rotate))
    out = Orientationd(keys="image", axcodes="RAS", labels=None)({"image": image})
    out = Spacingd(keys="image", pixdim=(0.7, 1.1, 0.9))(out)
    monai_shape = tuple(out["image"].shape[1:])
    geometry = Geometry(rotate, shape)
    ours = resampled_shape(shape, geometry.spacing, (0.7, 1.1, 0.9), geometry.affine, "RAS")
    assert ours == monai_shape == (37, 17, 22)
    assert ours != resampled_shape(shape, geometry.spacing, (0.7, 1.1, 0.9))  # the permutation matters here


def test_resampling_within_budget_returns_the_new_shape(tmp_path):
    geometry = Geometry.from_spacing((101, 81, 40), (0.5, 0.5, 2.0))
    shape = check_resample_budget(tmp_path / "s.nii", geometry, (1.0, 1.0, 1.0), bytes_per_voxel=12, budget=10)
    assert shape == (51, 41, 79)  # 51 * 41 * 79 voxels * 12 bytes = 1.98 MB, within 10 MB


def test_resampling_checks_its_inputs(tmp_path):
    geometry = Geometry.from_spacing((10, 10, 10), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="target spacing"):
        check_resample_budget(tmp_path / "s.nii", geometry, (1.0, 0.0, 1.0))
    bad = Geometry(np.diag([1.0, np.nan, 1.0, 1.0]), (10, 10, 10))
    with pytest.raises(ScanError, match="s.nii: voxel size"):
        check_resample_budget(tmp_path / "s.nii", bad, (1.0, 1.0, 1.0))


# --- the budget itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "available, expected", [(None, DEFAULT_CAP_MB), (200.0, MIN_DEFAULT_MB), (8000.0, 2000.0), (10**6, DEFAULT_CAP_MB)]
)
def test_default_budget_is_a_quarter_of_available_memory_within_bounds(monkeypatch, available, expected):
    monkeypatch.setattr(budget_module, "available_memory_mb", lambda: available)
    assert default_budget_mb() == pytest.approx(expected)


def test_available_memory_reads_meminfo_and_respects_a_container_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemFree:  100 kB\nMemAvailable:   8000000 kB\n")
    assert budget_module._meminfo_available_mb(meminfo) == pytest.approx(8000.0)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("3000000000\n")
    (v2 / "memory.current").write_text("1000000000\n")
    assert budget_module._cgroup_headroom_mb(v2) == pytest.approx(2000.0)
    (v2 / "memory.max").write_text("max\n")
    assert budget_module._cgroup_headroom_mb(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (v1 / "memory.usage_in_bytes").write_text("5")
    assert budget_module._cgroup_headroom_mb(tmp_path / "v1") is None
    monkeypatch.setattr(budget_module, "_meminfo_available_mb", lambda: 8000.0)
    monkeypatch.setattr(budget_module, "_cgroup_headroom_mb", lambda: 1200.0)
    assert budget_module.available_memory_mb() == pytest.approx(1200.0)


def test_default_budget_refuses_what_the_machine_cannot_hold(tmp_path, monkeypatch):
    path = phantoms.write_nifti(np.zeros((64, 64, 64), np.float32), np.eye(4), tmp_path / "v.nii.gz")  # 1 MB
    monkeypatch.setattr(budget_module, "MIN_DEFAULT_MB", 0.5)
    monkeypatch.setattr(budget_module, "available_memory_mb", lambda: 2.0)  # default budget 0.5 MB
    with pytest.raises(BudgetError, match="over the memory budget of 500 KB"):
        load(ref_for_path(path))


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "512"])
def test_memory_budget_setting_must_be_positive(value):
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        LoadOptions(memory_budget_mb=value)


def test_check_budget_is_public_and_exact(tmp_path):
    check_budget(tmp_path / "x.dcm", 2_000_000, "the thing", 2.0)  # equal to the budget: allowed
    with pytest.raises(BudgetError) as info:
        check_budget(tmp_path / "x.dcm", 2_000_001, "the thing", 2.0)
    assert str(info.value).startswith(f"{tmp_path / 'x.dcm'}: the thing would take 2 MB in memory")
    assert "--memory-budget 3" in str(info.value)


def test_budget_error_survives_a_process_boundary(tmp_path):
    error = BudgetError([tmp_path / "a.nii"], "the voxel data", 5 * 10**9, 10**9)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, BudgetError) and str(copy) == str(error) and copy.nbytes == error.nbytes


def test_info_takes_a_memory_budget(tmp_path, capsys):
    phantoms.write_nifti(np.zeros((64, 64, 64), np.float32), np.eye(4), tmp_path / "v.nii.gz")  # 1.05 MB decoded
    assert main(["info", str(tmp_path), "--memory-budget", "1"]) == 1
    out = capsys.readouterr().out
    assert "v.nii.gz" in out and "over the memory budget of 1 MB" in out and "--memory-budget 2" in out
    assert main(["info", str(tmp_path), "--memory-budget", "2"]) == 0
    assert main(["info", str(tmp_path), "--memory-budget", "0"]) == 1
    assert "memory_budget_mb must be a positive number" in capsys.readouterr().err


def test_gzip_bomb_builder_is_a_real_nifti(tmp_path):
    """The bomb is honest: its header parses and its stream inflates to exactly the declared voxels."""
    path = write_nifti_gzip_bomb(tmp_path / "b.nii.gz", (64, 32, 16))
    assert nib.load(str(path)).shape == (64, 32, 16)
    with gzip.open(path) as fh:
        assert len(fh.read()) == 352 + 64 * 32 * 16
    png = write_png_bomb(tmp_path / "p.png", 30, 20)
    with Image.open(io.BytesIO(png.read_bytes())) as img:
        img.load()
        assert img.size == (30, 20) and img.mode == "RGBA"
