"""Segment a folder: discover → (skip if done) → load → predict → export, scan by scan.

One scan's failure is recorded with its reason and the batch goes on. The CLI's
`medseg predict` and the Prefect flow's tasks both call these functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from medseg import __version__
from medseg.errors import MedsegError, ScanError
from medseg.export import export_mask, output_paths, remove_stale_parts
from medseg.infer import Predictor
from medseg.io import LoadOptions, ScanRef, discover, load

__all__ = ["CaseRecord", "BatchReport", "is_done", "predict_scan", "predict_folder", "write_batch_manifest"]


@dataclass
class CaseRecord:
    """What happened to one scan (small and JSON-ready: no arrays)."""

    case: str
    kind: str
    input: str
    status: str  # "written", "skipped" or "failed"
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0


@dataclass
class BatchReport:
    input: str
    output: str
    checkpoint: str
    classes: dict[str, int]
    records: list[CaseRecord] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"written": 0, "skipped": 0, "failed": 0}
        for record in self.records:
            out[record.status] += 1
        return out


def is_done(ref: ScanRef, output_dir: Path, checkpoint: Path, formats: Sequence[str] | None = None) -> bool:
    """Outputs exist and are newer than both the input files and the checkpoint."""
    outputs = output_paths(ref, output_dir, formats)
    if not outputs or not all(p.is_file() for p in outputs):
        return False
    newest_input = max(p.stat().st_mtime for p in ref.paths)
    ckpt = checkpoint / "best.pt" if checkpoint.is_dir() else checkpoint
    newest = max(newest_input, ckpt.stat().st_mtime)
    return min(p.stat().st_mtime for p in outputs) > newest


def predict_scan(
    predictor: Predictor,
    ref: ScanRef,
    output_dir: Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
) -> CaseRecord:
    """Segment and export one scan; every medseg error becomes a failed record."""
    start = time.monotonic()
    record = CaseRecord(ref.id, ref.kind, str(ref.path), "written")
    try:
        if not overwrite and is_done(ref, output_dir, predictor.checkpoint_path, formats):
            record.status = "skipped"
            record.outputs = [str(p) for p in output_paths(ref, output_dir, formats)]
            record.reason = "outputs newer than input and checkpoint (use --overwrite to redo)"
            return record
        scan = load(ref, LoadOptions(color=predictor.config.data.color))
        prediction = predictor.predict(scan)
        record.outputs = [str(p) for p in export_mask(prediction.mask, scan, output_dir, predictor.classes, formats)]
    except MedsegError as exc:
        record.status, record.reason = "failed", str(exc)
    except (OSError, ValueError, RuntimeError) as exc:  # anything else a scan can provoke
        record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
    record.seconds = round(time.monotonic() - start, 3)
    return record


def predict_folder(
    predictor: Predictor,
    input_path: Path,
    output_dir: Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BatchReport:
    """Segment every scan under ``input_path``; problems found by discovery are failures too."""
    found = discover(input_path)
    if not found.scans and not found.problems:
        raise ScanError(input_path, "holds no scan medseg can read", "point --input at DICOM series, NIfTI, TIFF or image files")
    remove_stale_parts(output_dir)  # debris of a run that was killed mid-write
    report = BatchReport(str(input_path), str(output_dir), str(predictor.checkpoint_path), dict(predictor.classes))
    for problem in found.problems:
        report.records.append(CaseRecord(Path(problem.paths[0]).name, "unknown", str(problem.paths[0]), "failed", reason=problem.reason))
    show = _tty() if progress is None else progress
    for ref in tqdm(found.scans, desc="predict", unit="scan", disable=not show):
        report.records.append(predict_scan(predictor, ref, output_dir, formats, overwrite))
    write_batch_manifest(report, output_dir)
    from medseg.review import write_review  # the page people open before they trust the masks

    write_review(output_dir, progress=False)
    return report


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def write_batch_manifest(report: BatchReport, output_dir: Path) -> Path:
    """predictions.json: classes, checkpoint and one record per scan (read by `medseg evaluate`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "medseg_version": __version__,
        "input": report.input,
        "checkpoint": report.checkpoint,
        "classes": report.classes,
        "counts": report.counts(),
        "records": [asdict(r) for r in report.records],
    }
    path = output_dir / "predictions.json"
    tmp = output_dir / ".predictions.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path
