"""Incremental runs: skip a scan whose masks were made from the same bytes by the same model.

Why not file times (``medseg.batch.is_done``) or Prefect's result cache: a scan copied
back from an archive, or replaced in place, keeps or gains an mtime that says nothing
about its content, and Prefect's cache neither keys on file content nor notices that
a mask was deleted. So each written scan leaves a small record in
``OUTPUT/.medseg-cache/<case id>.json`` holding a key over

- the sha256 of every input file of the scan, in reading order,
- the sha256 of the checkpoint file,
- what else shapes the mask: test-time augmentation, mask formats, medseg version,

and the masks it wrote. A scan is skipped only when the key matches and every one of
those masks still exists; then no model is loaded or run. The folder is hidden, so
``discover`` (and ``medseg evaluate``) never sees it; one file per case means parallel
tasks never write the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medseg import __version__
from medseg.export import default_formats
from medseg.io import ScanRef

__all__ = ["LEDGER_DIR", "ScanKey", "file_sha256", "scan_key", "find_outputs", "remember"]

LEDGER_DIR = ".medseg-cache"


@dataclass(frozen=True)
class ScanKey:
    """The identity of one scan's result: same key, same mask."""

    key: str
    inputs_sha256: str
    details: dict[str, Any]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed (a large series never sits in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def scan_key(ref: ScanRef, checkpoint_sha256: str, tta: bool, formats: Sequence[str] | None) -> ScanKey:
    """Hash the scan's input files and combine them with the model and the settings that shape its masks."""
    inputs = hashlib.sha256(ref.kind.encode())
    for path in ref.paths:
        inputs.update(bytes.fromhex(file_sha256(path)))
    details = {
        "inputs_sha256": inputs.hexdigest(),
        "checkpoint_sha256": checkpoint_sha256,
        "tta": bool(tta),
        "formats": list(formats or default_formats(ref.kind)),
        "medseg_version": __version__,
    }
    key = hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()
    return ScanKey(key, details["inputs_sha256"], details)


def _record_path(output_dir: Path, case: str) -> Path:
    return output_dir / LEDGER_DIR / f"{case}.json"


def find_outputs(output_dir: Path, case: str, key: ScanKey) -> list[Path] | None:
    """The masks recorded for ``key``, if the record matches and every mask is still there."""
    try:
        record = json.loads(_record_path(output_dir, case).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key.key:
        return None
    outputs = [output_dir / rel for rel in record.get("outputs", [])]
    if not outputs or not all(p.is_file() for p in outputs):
        return None
    return outputs


def remember(output_dir: Path, case: str, key: ScanKey, outputs: Sequence[Path]) -> Path:
    """Record (atomically) that ``outputs`` were made for ``key``."""
    path = _record_path(output_dir, case)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "case": case,
        "key": key.key,
        **key.details,
        "outputs": [Path(os.path.relpath(p, output_dir)).as_posix() for p in outputs],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
