"""Incremental runs: skip a scan whose masks were made from the same bytes by the same model, and are intact.

Why content, not file times: a scan copied back from an archive, or replaced in place,
keeps or gains an mtime that says nothing about its content, and a mask truncated by a
full disk or edited by hand is newer than everything. So each written scan leaves a small
record in ``OUTPUT/.medseg/ledger/<case id>.json`` holding a key over

- the sha256 of every input file of the scan, in reading order,
- the sha256 of the checkpoint file,
- what else shapes the mask: test-time augmentation, the inference settings (window overlap
  and size, precision, post-processing), mask formats, medseg version,

and, for each mask it wrote, its size and sha256 at write time. A scan is skipped only
when the key matches and every mask still has that size and hash; then no model is
loaded or run.

The record also says which files are medseg's: a file at a mask's name that no record of
its case names (a user's own ``scan1.nii.gz``) is never replaced without ``--overwrite``.
So that a run killed between a mask's rename and its record cannot leave a mask of ours
the ledger does not know, the record is written first with the key and the masks about to
be written marked ``pending`` (`intend`), and completed with sizes and hashes after the
write (`remember`); a pending entry is ours but never intact, so its scan is redone.
Masks of this case an earlier record named and this one no longer writes (another
format) stay named under ``earlier`` while they exist.

Records whose scan is no longer among the inputs name orphaned outputs: listed in the
reports, never deleted. The folder is hidden, so discovery (and
``medseg evaluate``) never sees it; one file per case means parallel workers never write
the same file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from medseg import __version__
from medseg.errors import MedsegError
from medseg.files import atomic_write_text, contained_path, ensure_inside, sha256_file
from medseg.ingest.scan import ScanRef

__all__ = [
    "abandon",
    "LEDGER_DIR",
    "ScanKey",
    "scan_key",
    "find_outputs",
    "intend",
    "recorded_paths",
    "relative_path",
    "remember",
    "orphans",
]

LEDGER_DIR = ".medseg/ledger"


@dataclass(frozen=True)
class ScanKey:
    """The identity of one scan's result: same key, same mask."""

    key: str
    details: dict[str, Any]


def scan_key(
    ref: ScanRef,
    checkpoint_sha256: str,
    tta: bool,
    formats: Sequence[str],
    settings: Mapping[str, Any] | None = None,
) -> ScanKey:
    """Hash the scan's input files and combine them with the model and the settings that shape its masks."""
    inputs = hashlib.sha256(ref.kind.encode())
    for path in ref.paths:
        inputs.update(bytes.fromhex(sha256_file(path)))
    details = {
        "inputs_sha256": inputs.hexdigest(),
        "checkpoint_sha256": checkpoint_sha256,
        "tta": bool(tta),
        "formats": list(formats),
        "settings": dict(settings or {}),  # overlap, window, precision, post-processing
        "medseg_version": __version__,
    }
    key = hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()
    return ScanKey(key, details)


def _record_path(output_dir: Path, case: str) -> Path:
    return contained_path(output_dir, case, ".json", folder=LEDGER_DIR)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _intact(output_dir: Path, entry: Any) -> Path | None:
    """The mask an output entry names, if it is inside the output folder and unchanged since it was written."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or entry.get("pending"):
        return None
    try:
        path = contained_path(output_dir, entry["path"])
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return None
        return path if sha256_file(path) == entry.get("sha256") else None
    except (OSError, ValueError, MedsegError):  # a path through a link out of the folder is not intact either
        return None


def find_outputs(output_dir: Path, case: str, key: ScanKey) -> list[Path] | None:
    """The masks recorded for ``key``, if the record matches and every mask is as it was written."""
    record = _read(_record_path(output_dir, case))
    if record is None or record.get("key") != key.key:
        return None
    entries = record.get("outputs")
    if not isinstance(entries, list) or not entries:
        return None
    outputs = [_intact(output_dir, entry) for entry in entries]
    return None if any(p is None for p in outputs) else outputs  # type: ignore[return-value]


def relative_path(output_dir: Path, path: Path) -> str:
    """``path`` relative to ``output_dir``, its folder resolved but not the file itself (a link is its own file)."""
    path = Path(path)
    return (path.parent.resolve() / path.name).relative_to(output_dir.resolve()).as_posix()


def _entry_paths(record: Mapping[str, Any] | None) -> list[str]:
    """The relative paths a record names: its outputs (written or pending) and earlier masks of its case."""
    if record is None:
        return []
    entries = (
        [e for e in record.get("outputs", []) if isinstance(e, dict)] if isinstance(record.get("outputs"), list) else []
    )
    earlier = record.get("earlier") if isinstance(record.get("earlier"), list) else []
    return [e["path"] for e in entries if isinstance(e.get("path"), str)] + [p for p in earlier if isinstance(p, str)]


def recorded_paths(output_dir: Path, case: str) -> set[str]:
    """Files (relative to ``output_dir``) the ledger names as this case's masks, under any key, pending or written."""
    return set(_entry_paths(_read(_record_path(output_dir, case))))


def _exists(output_dir: Path, rel: Any) -> bool:
    """Whether a recorded relative path names a file inside ``output_dir`` that exists (a name that
    leaves the folder is no mask of ours)."""
    try:
        return isinstance(rel, str) and contained_path(output_dir, rel).exists()
    except (OSError, ValueError, MedsegError):
        return False


def _write(output_dir: Path, case: str, key: ScanKey, entries: list[dict[str, Any]], source: str) -> Path:
    """The case's record, atomically, keeping earlier masks of the case that it no longer names and that exist."""
    path = _record_path(output_dir, case)
    named = {entry["path"] for entry in entries}
    earlier = []
    for rel in _entry_paths(_read(path)):
        if rel not in named and rel not in earlier and _exists(output_dir, rel):
            earlier.append(rel)
    payload = {"case": case, "input": source, "key": key.key, **key.details, "outputs": entries, "earlier": earlier}
    return atomic_write_text(path, json.dumps(payload, indent=2), root=output_dir)


def intend(output_dir: Path, case: str, key: ScanKey, outputs: Sequence[Path], source: str) -> Path:
    """Record (atomically), before they are written, that ``outputs`` are this case's masks for ``key``: pending."""
    entries = [{"path": relative_path(output_dir, path), "pending": True} for path in outputs]
    return _write(output_dir, case, key, entries, source)


def abandon(output_dir: Path, case: str) -> None:
    """After an export that failed in a live process: the case's record keeps only the masks that
    exist (still ours, still pending, so redone next time), and goes when none is left, so a
    failed scan leaves no bookkeeping about masks that were never written. Best effort: a full
    or read-only disk keeps the record as it was, which is safe (pending entries are never intact)."""
    path = _record_path(output_dir, case)
    record = _read(path)
    if record is None:
        return
    entries = record.get("outputs") if isinstance(record.get("outputs"), list) else []
    record["outputs"] = [e for e in entries if isinstance(e, dict) and _exists(output_dir, e.get("path"))]
    record["earlier"] = [rel for rel in record.get("earlier") or [] if _exists(output_dir, rel)]
    try:
        if record["outputs"] or record["earlier"]:
            atomic_write_text(path, json.dumps(record, indent=2), root=output_dir)
            return
        path.unlink(missing_ok=True)
        folder, top = path.parent, output_dir / LEDGER_DIR
        while folder != top.parent and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass


def remember(output_dir: Path, case: str, key: ScanKey, outputs: Sequence[Path], source: str) -> Path:
    """Record (atomically) that ``outputs`` were made for ``key``, with each mask's size and hash now."""
    entries = []
    for path in outputs:
        rel = relative_path(output_dir, path)
        entries.append({"path": rel, "size": Path(path).stat().st_size, "sha256": sha256_file(Path(path))})
    return _write(output_dir, case, key, entries, source)


def orphans(output_dir: Path, cases: Sequence[str]) -> list[dict[str, Any]]:
    """Recorded results whose scan is not among ``cases`` (its input has gone): case, input and outputs."""
    folder = output_dir / LEDGER_DIR
    try:
        if not folder.is_dir() or folder.is_symlink():
            return []
        ensure_inside(output_dir, folder)
    except MedsegError:
        return []
    current = set(cases)
    found = []
    for path in sorted(folder.rglob("*.json")):
        try:
            if path.is_symlink() or not ensure_inside(output_dir, path).is_file():
                continue  # only records medseg wrote, never a file a link points at
        except MedsegError:
            continue
        record = _read(path)
        if record is None or not isinstance(record.get("case"), str) or record["case"] in current:
            continue
        outputs = _entry_paths(record)
        found.append({"case": record["case"], "input": str(record.get("input", "")), "outputs": outputs})
    return found
