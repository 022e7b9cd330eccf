"""The memory budget: how much one scan may take once decoded, checked from its header.

A few kilobytes of compressed data can declare gigabytes of pixels (a gzip NIfTI of zeros,
an RLE DICOM frame of 65535 x 65535, a zlib TIFF strip, a PNG just under Pillow's limit).
Decoding first and failing later costs the machine its memory and the batch its other
scans, so every reader computes the decoded size from the header (dimensions x bytes per
voxel x channels x slices) and calls ``check_budget`` before a single pixel is decoded.
The Predictor calls ``check_resample_budget`` before resampling a scan to the model's
spacing, which can multiply the voxel count just as much.

The budget is a number of megabytes (10^6 bytes) for the decoded array of one scan:
``LoadOptions.memory_budget_mb`` (``--memory-budget MB`` on the command line) or, when
unset, a quarter of the memory available now (loading and preprocessing hold up to four
copies of a scan at once: decoded, stacked, rescaled, float32), at least
``MIN_DEFAULT_MB`` and at most ``DEFAULT_CAP_MB``. No environment variable changes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import ScanError

__all__ = [
    "DEFAULT_CAP_MB",
    "DEFAULT_FRACTION",
    "MIN_DEFAULT_MB",
    "BudgetError",
    "available_memory_mb",
    "budget_bytes",
    "check_budget",
    "check_frame_count",
    "check_resample_budget",
    "default_budget_mb",
    "dicom_nbytes",
    "format_size",
    "nifti_nbytes",
    "pil_nbytes",
    "resampled_shape",
    "tiff_nbytes",
]

# Share of the available memory one scan may take when no budget is set (see the module docstring).
DEFAULT_FRACTION = 0.25
# Upper bound of the default: 4096 MB refuses a 65535 x 65535 16-bit frame (8590 MB) on any
# machine, yet holds a 512 x 512 x 4000-slice CT (2097 MB). Larger scans need an explicit budget.
DEFAULT_CAP_MB = 4096.0
# Lower bound of the default, so that a machine under momentary pressure still reads ordinary scans.
MIN_DEFAULT_MB = 256.0
# Each frame of encapsulated (compressed) pixel data needs at least one item header of 8 bytes.
_ENCAPSULATED_FRAME_BYTES = 8


class BudgetError(ScanError):
    """A scan (or a step on it) would need more memory than the budget allows.

    Carries ``nbytes`` (what it would need) and ``budget_bytes`` (what it may take) so a
    batch report can show both; the message names the setting to raise and by how much.
    """

    def __init__(
        self, paths: Path | str | Iterable[Path | str], what: str, nbytes: int, budget: int, fix: str = ""
    ) -> None:
        self.what = what
        self.nbytes = int(nbytes)
        self.budget_bytes = int(budget)
        needed_mb = math.ceil(self.nbytes / 1e6)
        problem = (
            f"{what} would take {format_size(self.nbytes)} in memory, "
            f"over the memory budget of {format_size(self.budget_bytes)}"
        )
        fix = fix or (
            f"if this machine has the memory, raise the budget to at least {needed_mb} MB "
            f"(--memory-budget {needed_mb}, or LoadOptions(memory_budget_mb={needed_mb})); without it the budget is "
            f"a quarter of the available memory, at most {DEFAULT_CAP_MB:.0f} MB"
        )
        super().__init__(paths, problem, fix)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields when it crosses a process boundary (a Dask or process task runner).
        return (type(self), (self.paths, self.what, self.nbytes, self.budget_bytes, self.fix))


def format_size(nbytes: float) -> str:
    """A byte count in decimal units, as the budget is given: '8.59 GB', '512 MB', '3.4 KB'."""
    value = float(nbytes)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} bytes"


def _meminfo_available_mb(path: Path = Path("/proc/meminfo")) -> float | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) / 1000.0  # kB (kibibytes, as the kernel writes them) -> MB, near enough
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom_mb(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Memory left under this container's limit (cgroup v2, then v1); None when unlimited or unknown.

    Inside a container MemAvailable describes the host, so a 2 GB container on a 256 GB host
    would otherwise get the whole default cap and be killed by the kernel instead of refusing.
    """
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = float((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max":
            return None
        try:
            limit = float(limit_text)
        except ValueError:
            continue
        if limit >= 2**60:  # cgroup v1 writes "no limit" as a number near 2**63
            return None
        return max(limit - usage, 0.0) / 1e6
    return None


def available_memory_mb() -> float | None:
    """Memory this process could still get, in MB: MemAvailable, bounded by a container limit.

    Falls back to os.sysconf (available, else total physical pages) where /proc is missing;
    None when nothing tells.
    """
    available = _meminfo_available_mb()
    if available is None:
        try:
            pages = (
                os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names else os.sysconf("SC_PHYS_PAGES")
            )
            available = pages * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (ValueError, OSError, AttributeError):
            available = None
    headroom = _cgroup_headroom_mb()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def default_budget_mb() -> float:
    """The budget used when none is set: a quarter of the available memory, within bounds.

    Read afresh at every check, so that a batch refuses a scan it can no longer afford
    rather than the kernel killing the batch.
    """
    available = available_memory_mb()
    if available is None:
        return DEFAULT_CAP_MB
    return min(max(available * DEFAULT_FRACTION, MIN_DEFAULT_MB), DEFAULT_CAP_MB)


def budget_bytes(budget_mb: float | None = None) -> int:
    """The budget in bytes: ``budget_mb`` when given (validated), else ``default_budget_mb()``."""
    if budget_mb is None:
        budget_mb = default_budget_mb()
    elif (
        isinstance(budget_mb, bool)
        or not isinstance(budget_mb, (int, float))
        or not math.isfinite(budget_mb)
        or budget_mb <= 0
    ):
        raise ValueError(f"a memory budget is a positive number of MB, got {budget_mb!r}")
    return round(budget_mb * 1e6)


def check_budget(path: Path | str | Iterable[Path | str], nbytes: int, what: str, budget: float | None = None) -> None:
    """Refuse, with a BudgetError naming ``path``, when ``nbytes`` exceeds the budget.

    Args:
        path: the file(s) the size was read from (named in the message).
        nbytes: bytes the decoded data (or the step) would take, computed from headers.
        what: what would take them, e.g. "the decoded NIfTI voxel data (shape (1120, 1120, 1120), uint8)".
        budget: the budget in MB (``LoadOptions.memory_budget_mb``); None for the default.

    Example::

        check_budget(path, rows * cols * frames * 2, "the decoded pixel data", options.memory_budget_mb)
    """
    limit = budget_bytes(budget)
    if nbytes > limit:
        raise BudgetError(path, what, nbytes, limit)


# --- sizes from headers: nothing below decodes a pixel ----------------------------------


def nifti_nbytes(img: nib.Nifti1Image | nib.Nifti2Image) -> int:
    """Bytes of a NIfTI's voxel data as nibabel returns it (float64 when scl_slope/scl_inter scale it).

    The header's dimensions must already be known to be positive (``load_nifti`` checks them).
    """
    shape = img.header.get_data_shape()
    itemsize = img.header.get_data_dtype().itemsize
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    if (slope, inter) != (1.0, 0.0):
        itemsize = max(itemsize, np.dtype(np.float64).itemsize)
    return math.prod(int(s) for s in shape) * itemsize


def tiff_nbytes(tif: Any) -> int:
    """Bytes of every image series in an open ``tifffile.TiffFile``, from its tags (no strip is decoded)."""
    total = 0
    for series in tif.series:
        dtype = series.dtype
        itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
        total += math.prod(int(s) for s in series.shape) * itemsize
    return total


def pil_nbytes(img: Any, palette: str = "rgb") -> int:
    """Bytes of a Pillow image once decoded the way medseg reads it, from its (lazily read) header.

    A palette image becomes RGB(A) unless its indices are kept; CMYK/YCbCr/LAB/HSV become RGB;
    16-bit modes take two bytes and 'I'/'F' four per sample.
    """
    width, height = (int(v) for v in img.size)
    mode = str(img.mode)
    bands = len(img.getbands())
    if mode in ("P", "PA") and palette == "rgb":
        bands = 4 if "transparency" in getattr(img, "info", {}) or mode == "PA" else 3
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        bands = 3
    if mode.startswith("I;16"):
        itemsize = 2
    elif mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        itemsize = 4
    else:
        itemsize = 1
    return width * height * bands * itemsize


def _header_int(ds: Any, name: str, path: Path, default: int | None = None) -> int:
    try:
        value = ds.get(name)
        if value is None or str(value).strip() == "":
            if default is None:
                raise ScanError(path, f"DICOM image has no {name}", "the header is incomplete; re-export the file")
            return default
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ScanError(path, f"{name} is not an integer ({exc})", "the header is corrupt; re-export the file") from exc


def dicom_nbytes(path: Path, ds: Any, slices: int, samples: int) -> int:
    """Bytes of a DICOM series (or multi-frame file) once decoded, from one header.

    Rows x Columns x ``slices`` (files, or frames of a multi-frame file) x ``samples``
    (channels after decoding) x bytes per sample; compressed or not, the decoder
    allocates all of it. BitsAllocated 1 unpacks to one byte per pixel; a palette
    lookup yields up to 16 bits per channel.
    """
    rows = _header_int(ds, "Rows", path)
    cols = _header_int(ds, "Columns", path)
    bits = _header_int(ds, "BitsAllocated", path, default=16)
    if rows < 0 or cols < 0 or bits < 1:
        raise ScanError(
            path,
            f"Rows {rows}, Columns {cols}, BitsAllocated {bits} cannot describe an image",
            "the header is corrupt; re-export the file",
        )
    itemsize = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    if str(ds.get("PhotometricInterpretation", "") or "").strip().upper() == "PALETTE COLOR" and samples == 3:
        itemsize = 2
    return rows * cols * max(int(slices), 1) * max(int(samples), 1) * itemsize


def check_frame_count(path: Path, ds: Any, frames: int) -> None:
    """Refuse a NumberOfFrames below 1 or beyond what the file's size could hold, before any list of frames is built.

    Native pixel data needs every bit of every frame in the file; encapsulated
    (compressed) data needs at least an 8-byte item header per frame. The header is
    read without pixel data, so the file's size on disk is the bound.
    """
    if frames < 1:
        raise ScanError(
            path,
            f"NumberOfFrames is {frames}; an image has at least one frame",
            "the header is corrupt; re-export the file",
        )
    size = Path(path).stat().st_size
    if _maybe_compressed(ds):
        most = size // _ENCAPSULATED_FRAME_BYTES
        kind = f"at least {_ENCAPSULATED_FRAME_BYTES} bytes per compressed frame"
    else:
        rows = _header_int(ds, "Rows", path, default=1)
        cols = _header_int(ds, "Columns", path, default=1)
        bits = _header_int(ds, "BitsAllocated", path, default=1)
        samples = _header_int(ds, "SamplesPerPixel", path, default=1)
        frame_bits = max(rows * cols * samples * bits, 1)
        most = size * 8 // frame_bits
        kind = f"{frame_bits // 8} bytes per uncompressed frame"
    if frames > most:
        raise ScanError(
            path,
            f"NumberOfFrames {frames} is more than a file of {format_size(size)} can hold ({kind}: at most {most})",
            "the header is corrupt or the file truncated; re-export it",
        )


def _maybe_compressed(ds: Any) -> bool:
    """True unless the file meta names a known uncompressed transfer syntax (unknown: the lenient bound)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        return True
    try:
        return bool(syntax.is_compressed)
    except (AttributeError, ValueError):  # not a transfer syntax UID pydicom knows
        return True


# --- resampling --------------------------------------------------------------------------


def resampled_shape(
    shape: Sequence[int],
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    affine: np.ndarray | None = None,
    orientation: str | None = None,
) -> tuple[int, ...]:
    """The grid size after reorienting to ``orientation`` (if given) and resampling to ``target_spacing``.

    Follows MONAI's Orientationd then Spacingd: axes are first permuted to the target axis
    codes (which needs ``affine``), then an axis of n voxels of size s holds
    round((n - 1) * s / target) + 1 voxels, as ``monai.data.utils.compute_shape_offset`` has it.
    """
    shape = [int(s) for s in shape]
    spacing = [float(s) for s in spacing]
    if orientation and affine is not None:
        start = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        end = nib.orientations.axcodes2ornt(tuple(orientation))
        transform = nib.orientations.ornt_transform(start, end)
        new_shape, new_spacing = list(shape), list(spacing)
        for axis, (target_axis, _flip) in enumerate(transform[: len(shape)]):
            new_shape[int(target_axis)] = shape[axis]
            new_spacing[int(target_axis)] = spacing[axis]
        shape, spacing = new_shape, new_spacing
    target = list(target_spacing) + [target_spacing[-1]] * (len(shape) - len(target_spacing))
    return tuple(max(1, int(np.round((n - 1) * s / float(t) + 1.0))) for n, s, t in zip(shape, spacing, target))


def check_resample_budget(
    path: Path | str,
    geometry: Any,
    target_spacing: Sequence[float],
    *,
    orientation: str | None = None,
    bytes_per_voxel: int = 4,
    budget: float | None = None,
) -> tuple[int, ...]:
    """Refuse to resample a scan whose new grid would exceed the budget; returns the new shape.

    A scan whose voxels are much larger than the model's (a header that says 100 mm
    pixels, a model trained at 0.1 mm) multiplies its voxel count by the cube of the
    ratio: MONAI would then resample for minutes or die for memory. ``bytes_per_voxel``
    is what the caller keeps per resampled voxel (4 for one float32 channel; the
    Predictor also keeps class probabilities there).

    Args:
        path: the scan's file (named in the message).
        geometry: the scan's ``medseg.geometry.Geometry`` (shape, spacing, affine).
        target_spacing: the model's voxel size in mm, in the axis order after reorientation.
        orientation: the axis codes the preprocessing reorients to first (e.g. 'RAS'), if any.
        bytes_per_voxel: bytes held per voxel of the resampled grid.
        budget: the budget in MB; None for the default.
    """
    targets = [float(t) for t in target_spacing]
    if not targets or not all(math.isfinite(t) and t > 0 for t in targets):
        raise ValueError(f"target spacing must be positive and finite, got {list(target_spacing)}")
    spacing = [float(s) for s in geometry.spacing]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ScanError(
            path,
            f"voxel size {tuple(spacing)} mm is not positive and finite",
            "the header is corrupt; fix its spacing or re-export the scan",
        )
    shape = resampled_shape(geometry.shape, spacing, targets, geometry.affine, orientation)
    voxels = math.prod(shape)
    limit = budget_bytes(budget)
    nbytes = voxels * int(bytes_per_voxel)
    if nbytes > limit:
        source = ", ".join(f"{s:.4g}" for s in spacing)
        target = ", ".join(f"{t:.4g}" for t in targets)
        raise BudgetError(
            path,
            f"resampling from voxel size ({source}) mm, shape {tuple(geometry.shape)}, to the model's ({target}) mm "
            f"gives shape {shape} ({voxels:.3g} voxels), which",
            nbytes,
            limit,
            fix=(
                "check the scan's voxel size (PixelSpacing, pixdim, pixel size metadata): a wrong unit or a corrupt "
                "header is the usual cause; if it is right, raise the memory budget to at least "
                f"{math.ceil(nbytes / 1e6)} MB (--memory-budget) or use a model trained at a coarser spacing"
            ),
        )
    return shape
