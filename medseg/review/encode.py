"""One case of the review page: the scan, its mask and reference downsampled, packed and thumbnailed."""

from __future__ import annotations

import base64
import io
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medseg.errors import MedsegError
from medseg.files import atomic_write_text
from medseg.ingest import LoadOptions, Scan, ScanRef, load, ref_for_path
from medseg.review.batch import (
    DATA_FOLDER,
    MASK_OPTIONS,
    MAX_EDGE,
    MAX_VOXELS,
    THUMB_EDGE,
    Case,
    inside,
    mask_source,
    OutOfBounds,
)


__all__ = ["build_case", "script_json"]

log = logging.getLogger(__name__)


def _sample_indices(shape: Sequence[int]) -> list[np.ndarray]:
    """Evenly spread indices per axis: at most MAX_EDGE per axis and MAX_VOXELS in all."""
    keep = [min(int(n), MAX_EDGE) for n in shape]
    if len(keep) == 3:
        keep[2] = max(1, min(keep[2], MAX_VOXELS // (keep[0] * keep[1])))
    return [np.round(np.linspace(0, n - 1, m)).astype(np.int64) for n, m in zip(shape, keep)]


def _pack(array: np.ndarray) -> str:
    """zlib (level 1: 4x faster than 6 and as small here) + base64; 16-bit values as two byte
    planes (all low bytes, then all high bytes), which compress about a fifth better."""
    data = np.ascontiguousarray(array).reshape(-1)
    if data.dtype.itemsize == 2:
        data = np.ascontiguousarray(data.astype("<u2").view(np.uint8).reshape(-1, 2).T)
    return base64.b64encode(zlib.compress(data.tobytes(), 1)).decode("ascii")


def _encode_image(image: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Exact integers where they span at most 256 (8-bit) or 65536 (16-bit) levels, as CT
    Hounsfield units do; anything else on 65536 levels over [min, max]."""
    image = np.nan_to_num(image.astype(np.float64, copy=False))
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    integral = np.array_equal(image, np.round(image))
    if integral and hi - lo <= 255:
        quantised, dtype, scale = (image - lo).astype(np.uint8), "uint8", 1.0
    elif integral and hi - lo <= 65535:
        quantised, dtype, scale = (image - lo).astype(np.uint16), "uint16", 1.0
    else:
        scale = (hi - lo) / 65535.0
        quantised, dtype = np.round((image - lo) / scale).astype(np.uint16), "uint16"
    encoded = {"dtype": dtype, "offset": lo, "scale": scale, "data": _pack(quantised)}
    return encoded, lo + quantised * scale  # what the page will see, for the thumbnail


def _labels(mask: np.ndarray, legend: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Class values → legend index (0: background or a value of no class)."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    for entry in legend:
        out[mask == entry["value"]] = entry["index"]
    return out


def _axis_codes(scan: Scan) -> str | None:
    """Where each array axis points (e.g. 'RAS') for CT/MR, so the viewer shows radiological
    orientation; None for microscopy, shown as stored (x right, y down)."""
    if scan.ref.kind not in ("dicom", "nifti") or not scan.geometry.spacing_known:
        return None
    return scan.geometry.orientation[:3]


def _plane(shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(horizontal, vertical) array axes of a slice across ``axis``."""
    return {2: (0, 1), 1: (0, 2), 0: (1, 2)}[axis]


def _flips(codes: str | None, h: int, v: int) -> tuple[bool, bool]:
    """Patient's right on screen left, anterior left (sagittal), anterior / superior up."""
    if not codes:
        return False, False
    return codes[h] in "RA", codes[v] in "AS"


def _start_slices(labels: np.ndarray) -> list[int]:
    """Per axis, the slice holding the most foreground (the middle one where there is none)."""
    starts = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(labels, axis=others)
        starts.append(int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2)
    return starts


def _window(image: np.ndarray | None, modality: str) -> tuple[float, float]:
    """Default (level, width): CT soft tissue for CT (or Hounsfield-looking values), else the
    1st-99th percentile range."""
    if image is None or not image.size:
        return 0.5, 1.0
    if (modality.upper() == "CT" and image.min() < -500) or (image.min() <= -900 and image.max() >= 100):
        return 40.0, 400.0
    lo, hi = np.percentile(image.ravel()[:: max(1, image.size // 200_000)], [1, 99])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max()) + 1e-6
    return float(lo + hi) / 2, float(hi - lo)


def _thumbnail(
    view: np.ndarray | None,
    labels: np.ndarray,
    legend: Sequence[Mapping[str, Any]],
    window: tuple[float, float],
    codes: str | None,
    spacing: Sequence[float],
    z: int,
) -> str:
    """A small PNG (data URI) of slice ``z``: the scan in its window with the mask at half opacity."""
    h, v = _plane(labels.shape, 2)
    lab = labels[:, :, z]
    if view is not None:
        level, width = window
        grey = np.clip((view[:, :, z] - (level - width / 2)) / width * 255.0, 0, 255)
    else:
        grey = np.zeros(lab.shape)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for entry in legend:
        hit = lab == entry["index"]
        rgb[hit] = rgb[hit] * 0.5 + np.array(entry["colour"]) * 0.5
    flip_h, flip_v = _flips(codes, h, v)
    picture = np.transpose(rgb, (1, 0, 2))  # (x, y) → rows = y, columns = x
    if flip_h:
        picture = picture[:, ::-1]
    if flip_v:
        picture = picture[::-1]
    width_mm, height_mm = lab.shape[0] * spacing[h], lab.shape[1] * spacing[v]
    ratio = min(8.0, max(1 / 8.0, height_mm / width_mm)) if width_mm > 0 else 1.0
    size = (
        (THUMB_EDGE, max(1, round(THUMB_EDGE * ratio)))
        if ratio <= 1
        else (max(1, round(THUMB_EDGE / ratio)), THUMB_EDGE)
    )
    pil = Image.fromarray(np.ascontiguousarray(picture.astype(np.uint8))).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _load_one(path: Path, options: LoadOptions | None = None) -> Scan:
    return load(ref_for_path(path), options if options is not None else LoadOptions())


def build_case(
    case: Case,
    record: Mapping[str, Any],
    output_dir: Path,
    legend: Sequence[Mapping[str, Any]],
    reference: ScanRef | None,
    data_dir: Path,
    scan_roots: Sequence[Path],
) -> None:
    """Load mask, scan and reference of one case; write its data file; fill in the table row."""
    found: list[str] = []
    try:
        source = mask_source(record, output_dir, found)
    except OutOfBounds as exc:
        found.append(str(exc))
        source = None
    for problem in found:
        case.problems.append(
            f"case {case.id}: predictions.json's {problem}; medseg reads masks only from inside the "
            "output folder (run `medseg predict` again to rewrite predictions.json)"
        )
        case.notes.append(case.problems[-1])
    if source is None and found:
        return
    if source is None:
        case.notes.append(f"no mask found in {output_dir} for this case; run `medseg predict` again to write it")
        return
    try:
        mask = _load_one(source, MASK_OPTIONS)
    except MedsegError as exc:
        case.notes.append(f"mask unreadable: {exc}")
        return
    grid = mask.geometry
    case.shape = grid.shape
    spatial = mask.array[0]
    image, modality, codes = None, "", _axis_codes(mask)
    scan_path = str(record.get("input") or "")
    if not scan_path:
        case.notes.append("scan not shown (predictions.json names no input for this case); showing the mask alone")
    elif not any(inside(scan_path, root) for root in scan_roots):
        case.problems.append(
            f"case {case.id}: scan not shown, because predictions.json names {scan_path!r} as its "
            "scan, outside the batch's input folder (after links); showing the mask alone"
        )
        case.notes.append(case.problems[-1])
    else:
        try:
            scan = _load_one(Path(scan_path))
            if scan.geometry.shape != grid.shape:
                case.notes.append(
                    f"scan {scan_path} has shape {scan.geometry.shape}, mask {grid.shape}: scan not shown"
                )
            else:
                image = scan.array.mean(axis=0) if scan.channels > 1 else scan.array[0]
                modality, codes = scan.modality, _axis_codes(scan)
        except (MedsegError, OSError, ValueError) as exc:
            case.notes.append(f"scan not shown (cannot read {scan_path}: {exc}); showing the mask alone")
    ref_labels = None
    if reference is not None:
        try:
            ref = load(reference, MASK_OPTIONS)
            if ref.geometry.shape != grid.shape or ref.channels != 1:
                case.notes.append(
                    f"reference {reference.path} has shape {ref.geometry.shape}, mask {grid.shape}: no outline"
                )
            else:
                ref_labels = ref.array[0]
        except (MedsegError, OSError, ValueError) as exc:
            case.notes.append(f"reference outline not shown (cannot read {reference.path}: {exc})")

    pad = (slice(None),) * grid.ndim + ((None,) if grid.ndim == 2 else ())  # 2D → one slice
    picks = _sample_indices(grid.shape)
    take = np.ix_(*picks)
    labels = _labels(spatial[take], legend)[pad]
    shown = labels.shape
    spacing = [s * (n - 1) / max(m - 1, 1) for s, n, m in zip(grid.spacing, grid.shape, map(len, picks))] + [1.0]
    payload: dict[str, Any] = {
        "index": case.index,
        "id": case.id,
        "shape": list(shown),
        "source_shape": list(grid.shape),
        "spacing": spacing[:3] if grid.spacing_known else [1.0, 1.0, 1.0],
        "spacing_known": grid.spacing_known,
        "axes": codes,
        "modality": modality,
        "mask": _pack(labels),
        "reference": _pack(_labels(ref_labels[take], legend)[pad]) if ref_labels is not None else None,
        "image": None,
        "start": _start_slices(labels),
    }
    view = None
    if image is not None:
        payload["image"], view = _encode_image(image[take])
        view = view[pad]
    payload["window"] = list(_window(view, modality))
    if tuple(shown[: grid.ndim]) != tuple(grid.shape):
        kept = " x ".join(str(n) for n in shown[: grid.ndim])
        full = " x ".join(str(n) for n in grid.shape)
        case.notes.append(
            f"shown downsampled at {kept} of {full} voxels (evenly spaced, nearest voxel) to keep "
            "the page fast; open the mask file in 3D Slicer or ITK-SNAP for full resolution"
        )
    payload["notes"] = case.notes
    name = f"case-{case.index:04d}.js"
    text = "medsegReview.receive(" + script_json(payload) + ");\n"
    atomic_write_text(data_dir / name, text)
    case.file = f"{DATA_FOLDER}/{name}"
    case.thumbnail = _thumbnail(
        view, labels, legend, tuple(payload["window"]), codes, payload["spacing"], payload["start"][2]
    )


def script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can end or confuse the element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
