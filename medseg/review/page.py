"""The review page of a batch output folder, and the local server `medseg view` runs.

``write_review(output_dir)`` reads ``predictions.json`` (and ``metrics.json`` where
`medseg evaluate` wrote one) and writes, beside them:

- ``review.html``: one self-contained page (inline CSS, JS and plots; nothing is fetched
  from the network): batch summary, Dice distribution and learning curves, the failed
  scans with their reasons, a table of cases (thumbnail, status, Dice / IoU per class)
  and a slice viewer (slice slider, axis switch, window/level, overlay opacity, per-class
  colours and toggles, reference outline).
- ``review/case-NNNN.js``: one file per case, loaded only when the case is opened. It
  calls ``medsegReview.receive({...})`` with the scan, predicted mask and reference mask
  (zlib-compressed, base64) downsampled to at most ``MAX_EDGE`` pixels per in-plane axis
  and ``MAX_VOXELS`` voxels. A script file (not ``fetch``) so the page also works opened
  straight from disk (``file://``, where Chromium blocks fetch) as well as over http.

Thumbnails are inline ``data:`` images, so the folder gains no image file that
`medseg evaluate --pred` would mistake for a mask. Class colours are those of
``medseg.export.CLASS_COLOURS`` in the order DICOM SEG numbers its segments: every
class except the one valued 0 (background, not drawn), in ``classes`` order.

predictions.json is untrusted (a folder can be copied from anywhere), so the page embeds a
mask only from inside the output folder and a scan only from inside the batch's input
folder (or the output folder), after resolving links; a record naming anything else is
shown as a problem line, never read. The server answers only well-formed paths below its
folder: malformed ones get 400, missing ones (and links out) 404, and no traceback.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as _dt
import functools
import html
import io
import json
import logging
import math
import os
import re
import socket
import string
import sys
import threading
import urllib.parse
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from medseg import __version__
from medseg.constants import DEFAULT_HOST
from medseg.errors import MedsegError
from medseg.export import CLASS_COLOURS
from medseg.files import atomic_write_text, journal_root, tidy_journal
from medseg.ingest import LoadOptions, Scan, ScanRef, discover, load, ref_for_path

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_HOST",
    "LOOPBACK",
    "MAX_EDGE",
    "MAX_VOXELS",
    "PAGE_NAME",
    "ReviewError",
    "ReviewServer",
    "class_legend",
    "find_learning_curves",
    "read_batch",
    "review_is_stale",
    "write_review",
]

log = logging.getLogger(__name__)

PAGE_NAME = "review.html"
DATA_FOLDER = "review"
MAX_EDGE = 256  # pixels kept per in-plane axis (x, y); z keeps up to this many slices too
MAX_VOXELS = 2**22  # per case (4.2 M): 256 x 256 x 64; thinner z sampling beyond that
THUMB_EDGE = 96
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MASK_OPTIONS = LoadOptions(color="channels", palette="indices")
_MASK_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".png")
MAX_REQUEST_PATH = 2048  # characters; the page asks for paths under 40 (review/case-NNNN.js)
MAX_CURVES_BYTES = 32 * 2**20  # learning_curves.png written by `medseg train` is ~100 kB
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReviewError(MedsegError):
    """The review page cannot be written or served (the message says what to do)."""


# ----------------------------------------------------------------------------- the batch


def read_batch(output_dir: Path | str) -> dict[str, Any]:
    """``predictions.json`` of a batch output folder; ReviewError naming the fix if absent or bad."""
    folder = Path(output_dir)
    path = folder / "predictions.json"
    run_first = (
        f"run `medseg predict --checkpoint RUN --input SCANS --output {folder}` first (or point at the folder it wrote)"
    )
    if not folder.is_dir():
        raise ReviewError(f"{folder}: no such folder; {run_first}")
    if not path.is_file():
        raise ReviewError(f"{folder}: no predictions.json, so this is not a batch output folder; {run_first}")
    try:
        batch = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReviewError(f"{path}: cannot read it ({exc}); run `medseg predict` again to rewrite it") from exc
    if (
        not isinstance(batch, dict)
        or not isinstance(batch.get("records"), list)
        or not all(isinstance(r, dict) and "case" in r for r in batch["records"])
    ):
        raise ReviewError(f'{path}: holds no "records" list of cases; run `medseg predict` again to rewrite it')
    classes = batch.get("classes")
    if isinstance(classes, list):  # names in value order
        classes = {str(name): i for i, name in enumerate(classes)}
    batch["classes"] = {str(k): int(v) for k, v in (classes or {}).items()}
    return batch


def class_legend(classes: Mapping[str, int]) -> list[dict[str, Any]]:
    """Drawn classes: index 1.. (the value in the page's masks), name, value and RGB colour.

    Every class except the one valued 0 (background), in order, as DICOM SEG numbers its segments.
    """
    drawn = [(name, int(value)) for name, value in classes.items() if int(value) != 0]
    return [
        {"index": i, "name": name, "value": value, "colour": list(CLASS_COLOURS[(i - 1) % len(CLASS_COLOURS)])}
        for i, (name, value) in enumerate(drawn, start=1)
    ]


def find_learning_curves(
    batch: Mapping[str, Any], given: Path | None = None, notes: list[str] | None = None
) -> Path | None:
    """``given``, else ``learning_curves.png`` in the run folder of the batch's checkpoint, if any.

    The page embeds the file's bytes, so it must be a PNG (not a link out of the run folder to
    any other file that predictions.json's checkpoint entry could point at); a found file that
    is not is left out with a line in ``notes``, a ``given`` one is a ReviewError.
    """
    if given is not None:
        if not Path(given).is_file():
            raise ReviewError(f"{given}: no such file; pass the learning_curves.png of a training run folder")
        if problem := _png_problem(Path(given)):
            raise ReviewError(f"{given}: {problem}; pass the learning_curves.png of a training run folder")
        return Path(given)
    checkpoint = str(batch.get("checkpoint") or "")
    if not checkpoint or "\0" in checkpoint:
        return None
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    candidate = run_dir / "learning_curves.png"
    if not candidate.is_file():
        return None
    problem = _png_problem(candidate)
    if problem is None and not _inside(candidate, run_dir):
        problem = f"is a link to {candidate.resolve()}, outside the run folder {run_dir}"
    if problem is not None:
        if notes is not None:
            notes.append(f"learning curves not shown: {candidate} {problem}; pass --learning-curves PNG")
        return None
    return candidate


def _png_problem(path: Path) -> str | None:
    """Why ``path`` is not a PNG of sensible size to embed, if it is not."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(len(_PNG_SIGNATURE))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head != _PNG_SIGNATURE:
        return "is not a PNG file"
    if size > MAX_CURVES_BYTES:
        return f"is {size / 2**20:.0f} MiB, more than the {MAX_CURVES_BYTES // 2**20} MiB a learning-curve plot needs"
    return None


def _inside(path: Path | str, root: Path) -> bool:
    """True where ``path``, with every link resolved, lies in ``root`` (itself resolved).

    Why resolve: a name inside the folder can be a link to anywhere; a path with a NUL byte
    or a loop of links is not inside anything.
    """
    try:
        return Path(path).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def review_is_stale(output_dir: Path | str) -> bool:
    """True where review.html is missing or older than predictions.json or metrics.json."""
    folder = Path(output_dir)
    page = folder / PAGE_NAME
    if not page.is_file():
        return True
    sources = [folder / "predictions.json", folder / "metrics.json"]
    newest = max((p.stat().st_mtime for p in sources if p.is_file()), default=0.0)
    return page.stat().st_mtime < newest


# ----------------------------------------------------------------------------- one case


@dataclass
class _Case:
    """One row of the table (and, where a mask could be read, one viewer data file)."""

    index: int
    id: str
    kind: str
    status: str
    input: str
    reason: str = ""
    seconds: float = 0.0
    shape: tuple[int, ...] = ()
    file: str = ""
    thumbnail: str = ""
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # predictions.json naming files out of bounds


class _OutOfBounds(ValueError):
    """predictions.json names a file outside the folders the page may read (the message says which)."""


def _mask_source(record: Mapping[str, Any], output_dir: Path, problems: list[str]) -> Path | None:
    """The mask file (or PNG folder) of a record: its outputs first, then by case id.

    Only files inside ``output_dir`` (after links) are candidates. An output named outside it
    is looked for at the same relative place inside (the folder was copied or moved: its
    outputs still name the old place); failing that it is dropped, with a line in
    ``problems`` where it was absolute, held ``..`` or exists (a crafted or stale record).
    _OutOfBounds where the case id itself leads out: such a record is not shown at all.
    """
    root = output_dir.resolve()
    case_id = str(record["case"])
    folder = output_dir / case_id
    if "\0" in case_id or not _inside(folder, root):
        raise _OutOfBounds(f"case id {case_id!r} names a path outside the output folder {root}")
    outputs: list[Path] = []
    for text in record.get("outputs") or []:
        path = Path(str(text))
        if "\0" not in str(text) and _inside(path, root):
            outputs.append(path)
        elif (moved := _rebased(path, output_dir, root)) is not None:
            outputs.append(moved)
        elif "\0" in str(text) or path.is_absolute() or ".." in path.parts or os.path.lexists(path):
            problems.append(
                f"output {str(text)!r} lies outside the output folder {root} (or links out of it), so it is not read"
            )
    by_id = [output_dir / f"{case_id}{suffix}" for suffix in _MASK_SUFFIXES]
    for path in outputs + by_id:
        name = path.name.lower()
        if _inside(path, root) and path.is_file() and name.endswith(_MASK_SUFFIXES) and not name.endswith(".seg.dcm"):
            if name.endswith(".png") and sum(p.suffix.lower() == ".png" for p in outputs) > 1:
                return _contained_folder(path.parent, root)  # a PNG sequence: the folder is the mask
            return path
    if folder.is_dir() and folder.resolve() != root:  # an empty case id is not the whole folder
        return _contained_folder(folder, root)
    return None


def _rebased(path: Path, output_dir: Path, root: Path) -> Path | None:
    """The longest tail of ``path`` that names a file inside the output folder, if any."""
    parts = [part for part in path.parts[1 if path.is_absolute() else 0 :] if part not in ("", ".")]
    for start in range(len(parts)):
        tail = parts[start:]
        if ".." in tail:
            continue
        candidate = output_dir.joinpath(*tail)
        if candidate.is_file() and _inside(candidate, root):
            return candidate
    return None


def _contained_folder(folder: Path, root: Path) -> Path:
    """``folder`` if every entry below it stays inside ``root``; a reader would follow links out."""
    if not _inside(folder, root):
        raise _OutOfBounds(f"mask folder {folder} lies outside the output folder {root}")
    for entry in folder.rglob("*"):
        if not _inside(entry, root):
            raise _OutOfBounds(f"{entry} in mask folder {folder} is a link out of the output folder {root}")
    return folder


def _scan_roots(batch: Mapping[str, Any], output_dir: Path) -> tuple[list[Path], str | None]:
    """The folders a scan may be read from (output folder, batch input folder), and why not the latter.

    predictions.json names the input folder, so it is untrusted too: one that holds the output
    folder (``/``, a home folder) or lies inside it breaks the rule that input and output
    trees are disjoint, and would let a crafted file show any image on this machine.
    """
    root = output_dir.resolve()
    recorded = str(batch.get("input") or "")
    if not recorded:
        return [root], "predictions.json records no input folder, so scans are shown only from inside the output folder"
    try:
        folder = Path(recorded).resolve()
        tree = folder.parent if folder.is_file() else folder  # one scan file: its folder is the input tree
    except (OSError, RuntimeError, ValueError):
        return [root], f"predictions.json records an unusable input folder {recorded!r}; scans are not shown"
    if root.is_relative_to(tree) or tree.is_relative_to(root):
        return [root], (
            f"predictions.json records {recorded} as the input folder, which overlaps the output "
            f"folder {root} (input and output trees are disjoint), so scans outside {root} are not "
            "shown; run `medseg predict` again to rewrite predictions.json"
        )
    return [root, folder], None


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


def _build_case(
    case: _Case,
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
        source = _mask_source(record, output_dir, found)
    except _OutOfBounds as exc:
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
    elif not any(_inside(scan_path, root) for root in scan_roots):
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
    text = "medsegReview.receive(" + _script_json(payload) + ");\n"
    atomic_write_text(data_dir / name, text)
    case.file = f"{DATA_FOLDER}/{name}"
    case.thumbnail = _thumbnail(
        view, labels, legend, tuple(payload["window"]), codes, payload["spacing"], payload["start"][2]
    )


# ----------------------------------------------------------------------------- the page


def write_review(
    output_dir: Path | str,
    reference_dir: Path | str | None = None,
    learning_curves: Path | str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``review.html`` and ``review/`` into a batch output folder; returns the page's path.

    reference_dir: reference masks (paired by case id) drawn as outlines; default: the
    reference folder named in metrics.json, where it still exists.
    learning_curves: a training run's learning_curves.png; default: the one in the run
    folder of the checkpoint named in predictions.json, if there is one.
    progress: show a progress bar (default: when stderr is a terminal).
    """
    output_dir = Path(output_dir)
    with journal_root(output_dir):  # temporary files under review/ are journalled where cleanup looks
        page = _write_review(output_dir, reference_dir, learning_curves, progress)
    tidy_journal(output_dir)
    return page


def _write_review(
    output_dir: Path, reference_dir: Path | str | None, learning_curves: Path | str | None, progress: bool | None
) -> Path:
    batch = read_batch(output_dir)
    classes: dict[str, int] = batch["classes"]
    legend = class_legend(classes)
    notes: list[str] = []
    metrics = _read_metrics(output_dir, notes)
    if reference_dir is None and metrics and metrics.get("reference_folder"):
        candidate = Path(metrics["reference_folder"])
        reference_dir = candidate if candidate.is_dir() else None
    elif reference_dir is not None and not Path(reference_dir).is_dir():
        raise ReviewError(f"{reference_dir}: no such folder; pass the folder of reference masks (named by case id)")
    references = _reference_index(Path(reference_dir), notes) if reference_dir is not None else {}
    if metrics is None and reference_dir is not None:
        metrics = _evaluate_in_memory(output_dir, Path(reference_dir), classes, notes)
    curves = find_learning_curves(batch, Path(learning_curves) if learning_curves is not None else None, notes)
    scan_roots, scan_note = _scan_roots(batch, output_dir)
    if scan_note:
        notes.append(scan_note)
    unpaired = (metrics or {}).get("unpaired_predictions") or []
    if unpaired:
        notes.append(
            f"{len(unpaired)} case(s) have no reference mask, so no scores: "
            + ", ".join(unpaired[:10])
            + (" and more" if len(unpaired) > 10 else "")
        )

    data_dir = output_dir / DATA_FOLDER
    if data_dir.is_symlink() or (data_dir.exists() and not _inside(data_dir, output_dir)):
        raise ReviewError(
            f"{data_dir}: is a link (to {data_dir.resolve()}); medseg writes and prunes the page's "
            f"case files only inside {output_dir}, so remove the link and run again"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    scores = {c["case"]: c for c in (metrics or {}).get("cases", [])}
    cases: list[_Case] = []
    records = batch["records"]
    for index, record in enumerate(records, start=1):
        case = _Case(
            index,
            str(record.get("case", f"case {index}")),
            str(record.get("kind", "")),
            str(record.get("status", "")),
            str(record.get("input", "")),
            str(record.get("reason", "")),
            float(record.get("seconds") or 0.0),
        )
        case.scores = scores.get(case.id, {}).get("classes", {})
        case.notes.extend(_record_notes(record))
        cases.append(case)

    def build(case: _Case) -> None:
        if case.status not in ("written", "skipped"):
            return
        try:
            _build_case(
                case, records[case.index - 1], output_dir, legend, references.get(case.id), data_dir, scan_roots
            )
        except (MedsegError, OSError, ValueError, MemoryError) as exc:
            case.notes.append(f"cannot show this case: {type(exc).__name__}: {exc}")

    show = progress if progress is not None else sys.stderr.isatty()
    # Threads: reading (gzip) and compressing (zlib) release the GIL; a few scans in memory at once.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        context = contextvars.copy_context()  # the journal root travels into the worker threads
        built = pool.map(lambda case: context.copy().run(build, case), cases)
        for _ in tqdm(built, total=len(cases), desc="review", unit="case", disable=not show):
            pass
    _remove_stale(data_dir, {Path(c.file).name for c in cases if c.file})
    notes.extend(problem for c in cases for problem in c.problems)  # in case order, after the threads
    page = _page(output_dir, batch, legend, cases, metrics, curves, notes)
    return atomic_write_text(output_dir / PAGE_NAME, page)


MAX_RECORD_NOTES = 50  # notes per case taken from predictions.json
MAX_NOTE_CHARS = 1000


def _record_notes(record: Mapping[str, Any]) -> list[str]:
    """The reader's notes on a case's scan (slice gaps, obliquity, compression, generated UIDs) in predictions.json.

    Why: the page is where a person decides whether to trust a mask, so what the reader noticed
    or assumed about the scan belongs beside it. predictions.json is a file like any other: only
    strings are kept, at most MAX_RECORD_NOTES of them, each cut to MAX_NOTE_CHARS characters.
    """
    notes = record.get("notes")
    if not isinstance(notes, list):
        return []
    return [note[:MAX_NOTE_CHARS] for note in notes[:MAX_RECORD_NOTES] if isinstance(note, str)]


def _read_metrics(output_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"metrics.json unreadable ({exc}); run `medseg evaluate` again to rewrite it")
        return None
    return metrics if isinstance(metrics, dict) else None


def _reference_index(reference_dir: Path, notes: list[str]) -> dict[str, ScanRef]:
    try:
        found = discover(reference_dir)
    except MedsegError as exc:
        notes.append(f"reference outlines not shown: {exc}")
        return {}
    return {ref.id: ref for ref in found.scans}


def _evaluate_in_memory(
    output_dir: Path, reference_dir: Path, classes: Mapping[str, int], notes: list[str]
) -> dict[str, Any] | None:
    from medseg.evaluation.evaluate import evaluate_folders

    try:
        report = evaluate_folders(output_dir, reference_dir, classes=classes or None, progress=False)
    except MedsegError as exc:
        notes.append(f"no scores: {exc}")
        return None
    notes.append(
        f"scores computed for this page against {reference_dir}; run `medseg evaluate --pred {output_dir} "
        f"--ref {reference_dir}` to keep them as metrics.csv / metrics.json"
    )
    return report.to_dict()


WRITTEN_INDEX = ".medseg/review-files.json"  # (in the output folder) the case files the page wrote


def _remove_stale(data_dir: Path, keep: set[str]) -> None:
    """Delete case files an earlier page wrote and this one did not; a user's files there are never touched.

    Only names in the previous page's own index (``OUTPUT/.medseg/review-files.json``) that
    have the exact form medseg gives them are removed; then the index lists this page's files.
    """
    index = data_dir.parent / WRITTEN_INDEX
    try:
        previous = json.loads(index.read_text())
    except (OSError, ValueError):
        previous = []
    for name in previous if isinstance(previous, list) else []:
        if isinstance(name, str) and name not in keep and re.fullmatch(r"case-\d{4,}\.js", name):
            path = data_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
    atomic_write_text(index, json.dumps(sorted(keep)))


def _asset(name: str) -> str:
    return resources.files("medseg.review").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can end or confuse the element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.3f}"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _page(
    output_dir: Path,
    batch: Mapping[str, Any],
    legend: Sequence[Mapping[str, Any]],
    cases: Sequence[_Case],
    metrics: Mapping[str, Any] | None,
    curves: Path | None,
    notes: list[str],
) -> str:
    from medseg.evaluation.plots import plot_dice_distribution

    e = html.escape
    classes = [x["name"] for x in legend] + [n for n in batch["classes"] if n not in {x["name"] for x in legend}]
    colours = {entry["name"]: tuple(entry["colour"]) for entry in legend}
    counts = {s: sum(c.status == s for c in cases) for s in ("written", "skipped", "failed")}

    plots = []
    dice = {name: [_number(c.scores.get(name, {}).get("dice")) for c in cases if c.scores] for name in classes}
    chart = plot_dice_distribution(dice, colours) if metrics else None
    if chart:
        plots.append(
            f'<figure class="card"><img alt="Dice per class" src="{_png_uri(chart)}"><figcaption>Dice per class: '
            "a box (quartiles, median) and one dot per case.</figcaption></figure>"
        )
    elif not metrics:
        notes.append(
            f"no metrics.json: run `medseg evaluate --pred {output_dir} --ref REFERENCE_MASKS`, or "
            "`medseg view --reference REFERENCE_MASKS --rebuild`, for Dice / IoU and reference outlines"
        )
    if curves is not None:
        plots.append(
            f'<figure class="card"><img alt="learning curves" src="{_png_uri(curves.read_bytes())}"><figcaption>'
            f"Learning curves of the training run ({e(str(curves))}).</figcaption></figure>"
        )

    failures = [(c.id, c.input, c.reason) for c in cases if c.status == "failed"]
    failures += [
        (f["case"], ", ".join(f.get("paths", [])), "evaluation: " + f["reason"])
        for f in (metrics or {}).get("failures", [])
    ]
    failure_items = "".join(
        f"<li><b>{e(case)}</b> <code>{e(path)}</code><br>{e(reason)}</li>" for case, path, reason in failures
    )

    summary = (metrics or {}).get("summary", {}).get("classes", {})
    head = (
        "".join(
            f'<th data-type="num"><span class="swatch" style="background:{_css(colours.get(n))}"></span>'
            f"{e(n)}<br>{m}</th>"
            for n in classes
            for m in ("Dice", "IoU")
        )
        if metrics
        else ""
    )
    rows = []
    for c in cases:
        cells = (
            "".join(
                _score_cell(c.scores.get(n, {}).get(m.lower()) if c.scores else None)
                for n in classes
                for m in ("Dice", "IoU")
            )
            if metrics
            else ""
        )
        thumb = f'<img class="thumb" alt="" loading="lazy" src="{c.thumbnail}">' if c.thumbnail else ""
        title = f' title="{e(c.reason)}"' if c.reason else ""
        shape = " x ".join(map(str, c.shape))
        rows.append(
            f'<tr class="case status-{e(c.status)}" data-index="{c.index}" tabindex="0"><td>{thumb}</td>'
            f'<td class="id">{e(c.id)}</td><td class="status"{title}>{e(c.status)}</td>{cells}<td>{e(c.kind)}</td>'
            f'<td>{shape}</td><td data-value="{c.seconds}">{c.seconds:.1f}</td></tr>'
        )
    foot = ""
    if metrics and summary:
        means = "".join(
            f"<td>{_fmt(summary.get(n, {}).get(m.lower(), {}).get('mean'))}</td>"
            for n in classes
            for m in ("Dice", "IoU")
        )
        foot = (
            f"<tfoot><tr><td></td><td>mean over {len(metrics.get('cases', []))} scored</td><td></td>{means}"
            '<td colspan="3"></td></tr></tfoot>'
        )

    legend_items = "".join(
        f'<label class="class"><input type="checkbox" data-class="{x["index"]}" checked>'
        f'<span class="swatch" style="background:{_css(x["colour"])}"></span>{e(x["name"])} '
        f"<small>({x['value']})</small></label>"
        for x in legend
    )
    background = [n for n, v in batch["classes"].items() if v == 0]
    data = {
        "classes": legend,
        "cases": [
            {"index": c.index, "id": c.id, "file": c.file, "status": c.status, "reason": c.reason, "notes": c.notes}
            for c in cases
        ],
    }
    fields = {
        "title": e(str(output_dir.resolve().name)),
        "css": _asset("review.css"),
        "js": _asset("review.js"),
        "generated": e(_dt.datetime.now().isoformat(timespec="seconds")),
        "version": e(str(batch.get("medseg_version", "?"))),
        "builder": e(__version__),
        "input": e(str(batch.get("input", ""))),
        "checkpoint": e(str(batch.get("checkpoint") or "(none recorded)")),
        "counts": f"{len(cases)} cases: {counts['written']} written, {counts['skipped']} skipped (up to date), "
        f"{counts['failed']} failed",
        "notes": "".join(f"<li>{e(n)}</li>" for n in notes),
        "plots": "".join(plots),
        "failure_count": str(len(failures)),
        "failures": f"<ul>{failure_items}</ul>" if failures else "<p class=muted>None.</p>",
        "head": head,
        "rows": "".join(rows),
        "foot": foot,
        "legend": legend_items or "<span class=muted>no classes to draw</span>",
        "background": e(", ".join(background) or "value 0"),
        "max_edge": str(MAX_EDGE),
        "max_voxels": f"{MAX_VOXELS:,}",
        "data": _script_json(data),
    }
    return string.Template(_asset("review.html")).substitute(fields)


def _css(rgb: Sequence[int] | None) -> str:
    r, g, b = rgb or (128, 128, 128)
    return f"rgb({r},{g},{b})"


def _score_cell(value: Any) -> str:
    number = _number(value)
    if not math.isfinite(number):
        shown = "inf" if number == math.inf else "–"
        return f'<td class="score" data-value="">{shown}</td>'
    hue = round(120 * min(max(number, 0.0), 1.0))
    return f'<td class="score" data-value="{number}" style="background:hsl({hue},65%,85%)">{number:.3f}</td>'


# ----------------------------------------------------------------------------- the server


_PERCENT_OK = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _request_segments(target: str) -> tuple[list[str], bool]:
    """The folder-relative name segments an HTTP request target asks for, and whether it ends in '/'.

    ValueError (the server answers 400) where the target is malformed. Why so strict: the page
    asks only for ``/review.html`` and ``/review/case-NNNN.js``, so NUL or control bytes, bad
    percent-encoding or UTF-8, ``.`` / ``..`` / empty segments, backslashes, drive letters and
    absolute-form or overlong targets come from a probe or a broken client, never the page.
    """
    if len(target) > MAX_REQUEST_PATH:
        raise ValueError(f"the path is longer than {MAX_REQUEST_PATH} characters")
    if not target.startswith("/"):
        raise ValueError("the target is not a path starting with '/'")
    path = target.split("?", 1)[0].split("#", 1)[0]
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c == "\\" for c in path):
        raise ValueError("the path holds a space, control, non-ASCII or backslash character unencoded")
    if _PERCENT_OK.search(path):
        raise ValueError("the path holds a '%' not followed by two hex digits")
    try:
        decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("the path's percent-encoded bytes are not UTF-8") from exc
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in decoded):
        raise ValueError("the decoded path holds a NUL, control or backslash character")
    parts = decoded[1:].split("/")
    trailing = len(parts) > 1 and parts[-1] == ""
    if trailing or parts == [""]:
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError("the path has an empty, '.' or '..' segment")
        if ":" in part or len(part) > 255:
            raise ValueError("a path segment holds ':' (a drive or stream name) or is over 255 characters")
    return parts, trailing or decoded == "/"


class _Handler(SimpleHTTPRequestHandler):
    """Read-only files below one folder: no listings, no way out (``..``, links) of it.

    The base class maps the URL to a file itself (and raises on a NUL byte); here every target
    is parsed strictly first (400), then resolved and checked to lie in the folder (404).
    """

    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".html": "text/html",
    }

    def send_head(self):  # type: ignore[override]
        allowed = getattr(self.server, "allowed_hosts", None)
        if allowed is not None and self.headers.get("Host", "").lower() not in allowed:
            self.send_error(403, "Unexpected Host header")  # a page elsewhere reaching in (DNS rebinding)
            return None
        words = self.requestline.split()  # the target as sent: the base class folds a leading '//' into '/'
        try:
            parts, wants_folder = _request_segments(words[1] if len(words) >= 2 else self.path)
        except ValueError as exc:
            self.send_error(400, "Bad request path", f"{exc}; ask for /{PAGE_NAME}")
            return None
        if any(part.startswith(".") for part in parts):  # .medseg/ (ledger, journal): input paths, not for the page
            self.send_error(404, "File not found")
            return None
        root = Path(self.directory).resolve()
        try:
            resolved = root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            self.send_error(404, "Not found")
            return None
        if not resolved.is_relative_to(root):
            self.send_error(404, "Not found")  # a link out of the folder: as if it were not there
            return None
        if resolved.is_dir():
            if resolved == root:
                self.send_response(302)
                self.send_header("Location", "/" + PAGE_NAME)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_error(403, "No folder listings")
            return None
        if wants_folder or not resolved.is_file():
            self.send_error(404, "Not found")  # 'file/' or a device, socket or pipe
            return None
        return self._open(resolved)

    def _open(self, resolved: Path) -> io.BufferedReader | None:
        """Headers and the open file, checking that what was opened is what was resolved (no swap)."""
        try:
            handle = resolved.open("rb")
        except OSError:
            self.send_error(404, "Not found")
            return None
        try:
            opened, named = os.fstat(handle.fileno()), os.stat(resolved)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
                raise FileNotFoundError(resolved)
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(str(resolved)))
            self.send_header("Content-Length", str(opened.st_size))
            self.send_header("Last-Modified", self.date_time_string(int(opened.st_mtime)))
            self.end_headers()
        except OSError:
            handle.close()
            self.send_error(404, "Not found")
            return None
        except BaseException:
            handle.close()
            raise
        return handle

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # the base class's argument name
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """One line in the log, not a traceback on stderr, when a request ends in an exception
    (mostly a browser closing the connection mid-file)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(exc, ConnectionError) else logging.WARNING
        log.log(level, "medseg view: request from %s ended early: %s: %s", client_address[0], type(exc).__name__, exc)


class ReviewServer:
    """Serves one folder over HTTP from a background thread; 127.0.0.1 and a free port by default.

    Example::

        with ReviewServer("predictions") as server:
            print(server.url + "review.html")
    """

    def __init__(self, root: Path | str, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ReviewError(f"{root}: no such folder; pass the output folder of `medseg predict`")
        handler = functools.partial(_Handler, directory=str(self.root))
        server_class = type(
            "Server",
            (_Server,),
            {
                "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            },
        )
        try:
            self.httpd = server_class((host, port), handler)
        except OSError as exc:
            raise ReviewError(
                f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --port, "
                "or leave it out for a free one"
            ) from exc
        self._thread: threading.Thread | None = None
        bound = self.httpd.server_address[1]
        if host in LOOPBACK:  # only this machine's names, so another site cannot borrow the port
            self.httpd.allowed_hosts = {f"{name}:{bound}" for name in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="medseg-view", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (or ``timeout`` seconds pass)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
