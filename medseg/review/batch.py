"""What a review page is built from: a batch output folder read as untrusted data.

predictions.json can come from anywhere, so every path it names is resolved and must lie inside
the output folder (masks) or the batch's input folder (scans); anything else becomes a problem line.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.export import CLASS_COLOURS
from medseg.ingest import LoadOptions, ScanRef, discover

__all__ = [
    "Case",
    "OutOfBounds",
    "ReviewError",
    "class_legend",
    "evaluate_in_memory",
    "inside",
    "mask_source",
    "read_metrics",
    "record_notes",
    "reference_index",
    "allowed_scan_roots",
    "find_learning_curves",
    "read_batch",
    "review_is_stale",
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
        raise ReviewError(f"{folder}: {_not_a_folder(folder, run_first)}")
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


def _not_a_folder(path: Path, run_first: str) -> str:
    """Why ``path`` is no batch folder and what to pass instead, in words (the start of one sentence).

    Why: `medseg view a.nii.gz` (a scan), `medseg view out/predictions.json` (a file of the batch)
    and a typo are different mistakes, and each has its own fix.
    """
    predict = "the output folder of `medseg predict` (the folder holding predictions.json, the masks and review.html)"
    if path.is_file():
        if (path.parent / "predictions.json").is_file():
            return f"is a file, not a folder; medseg view takes the batch folder holding it: medseg view {path.parent}"
        return f"is a file, not a folder; medseg view takes {predict}, not a scan or a mask"
    if path.is_symlink():
        return f"is a link to {os.readlink(path)}, which does not exist; point it at a batch folder, or {run_first}"
    if path.exists():
        kind = "a FIFO" if stat.S_ISFIFO(path.stat().st_mode) else "a device or socket"
        return f"is {kind}, not a folder; medseg view takes {predict}"
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"does not exist ({blocker} is a file, not a folder); medseg view takes {predict}"
    return f"does not exist; {run_first}"


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
    if problem is None and not inside(candidate, run_dir):
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


def inside(path: Path | str, root: Path) -> bool:
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
class Case:
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


class OutOfBounds(ValueError):
    """predictions.json names a file outside the folders the page may read (the message says which)."""


def mask_source(record: Mapping[str, Any], output_dir: Path, problems: list[str]) -> Path | None:
    """The mask file (or PNG folder) of a record: its outputs first, then by case id.

    Only files inside ``output_dir`` (after links) are candidates. An output named outside it
    is looked for at the same relative place inside (the folder was copied or moved: its
    outputs still name the old place); failing that it is dropped, with a line in
    ``problems`` where it was absolute, held ``..`` or exists (a crafted or stale record).
    OutOfBounds where the case id itself leads out: such a record is not shown at all.
    """
    root = output_dir.resolve()
    case_id = str(record["case"])
    folder = output_dir / case_id
    if "\0" in case_id or not inside(folder, root):
        raise OutOfBounds(f"case id {case_id!r} names a path outside the output folder {root}")
    outputs: list[Path] = []
    for text in record.get("outputs") or []:
        path = Path(str(text))
        if "\0" not in str(text) and inside(path, root):
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
        if inside(path, root) and path.is_file() and name.endswith(_MASK_SUFFIXES) and not name.endswith(".seg.dcm"):
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
        if candidate.is_file() and inside(candidate, root):
            return candidate
    return None


def _contained_folder(folder: Path, root: Path) -> Path:
    """``folder`` if every entry below it stays inside ``root``; a reader would follow links out."""
    if not inside(folder, root):
        raise OutOfBounds(f"mask folder {folder} lies outside the output folder {root}")
    for entry in folder.rglob("*"):
        if not inside(entry, root):
            raise OutOfBounds(f"{entry} in mask folder {folder} is a link out of the output folder {root}")
    return folder


def allowed_scan_roots(batch: Mapping[str, Any], output_dir: Path) -> tuple[list[Path], str | None]:
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


MAX_RECORD_NOTES = 50  # notes per case taken from predictions.json
MAX_NOTE_CHARS = 1000


def record_notes(record: Mapping[str, Any]) -> list[str]:
    """The reader's notes on a case's scan (slice gaps, obliquity, compression, generated UIDs) in predictions.json.

    Why: the page is where a person decides whether to trust a mask, so what the reader noticed
    or assumed about the scan belongs beside it. predictions.json is a file like any other: only
    strings are kept, at most MAX_RECORD_NOTES of them, each cut to MAX_NOTE_CHARS characters.
    """
    notes = record.get("notes")
    if not isinstance(notes, list):
        return []
    return [note[:MAX_NOTE_CHARS] for note in notes[:MAX_RECORD_NOTES] if isinstance(note, str)]


def read_metrics(output_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"metrics.json unreadable ({exc}); run `medseg evaluate` again to rewrite it")
        return None
    return metrics if isinstance(metrics, dict) else None


def reference_index(reference_dir: Path, notes: list[str]) -> dict[str, ScanRef]:
    try:
        found = discover(reference_dir)
    except MedsegError as exc:
        notes.append(f"reference outlines not shown: {exc}")
        return {}
    return {ref.id: ref for ref in found.scans}


def evaluate_in_memory(
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
