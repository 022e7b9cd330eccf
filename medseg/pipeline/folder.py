"""Segment a folder with one Predictor, and write the batch's reports whatever happened to its scans."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medseg import __version__
from medseg.errors import MedsegError, ScanError
from medseg.files import atomic_write_text, tidy_journal
from medseg.ingest import Problem, ScanRef, discover
from medseg.pipeline.output import OutputUnwritable, output_lock, prepare_output
from medseg.pipeline.scan import CaseRecord, Job, coding_of, failure_reason, problem_record, segment_scan

__all__ = ["BatchReport", "segment_cases", "segment_folder", "write_batch_manifest", "write_batch_reports"]


@dataclass
class BatchReport:
    input: str
    output: str
    checkpoint: str
    classes: dict[str, int]
    records: list[CaseRecord] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why the batch stopped early, if it did
    checkpoint_files: list[str] = field(default_factory=list)  # every model's file (several: an ensemble, folds)

    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"written": 0, "skipped": 0, "failed": 0}
        for record in self.records:
            out[record.status] += 1
        return out


def segment_folder(
    predictor: Any,
    input_path: Path,
    output_dir: Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BatchReport:
    """Segment every scan under ``input_path`` with one Predictor; problems found by discovery are failures too.

    ``predictor`` is a `Predictor` or an `Ensemble` (anything with their interface). The
    reports (predictions.json, review page) are written whatever happened to the scans;
    if the output folder stopped taking writes, the report says so in ``stopped``. The
    folder is locked for the run (`output_lock`): a second run on it is refused at once.
    """
    found = discover(input_path)
    if not found.scans and not found.problems:
        raise ScanError(
            input_path, "holds no scan medseg can read", "point --input at DICOM series, NIfTI, TIFF or image files"
        )
    prepare_output(input_path, output_dir, found.scans)
    with output_lock(output_dir):
        batch = [(ref, predictor) for ref in found.scans]
        return _segment_locked(batch, input_path, output_dir, found.problems, formats, overwrite, progress)


def segment_cases(
    batch: Sequence[tuple[ScanRef, Any]],
    output_dir: Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    checkpoint: str | None = None,
) -> BatchReport:
    """Segment chosen scans, each with its own predictor: the cases of a recorded split (each fold's
    held-out cases by that fold's model), or cases named by id. Same rules and reports as
    `segment_folder`; the input tree checked against the output is the folder holding every scan.

    checkpoint: what predictions.json names as the model (default: the first predictor's checkpoint).
    """
    if not batch:
        raise ScanError(output_dir, "no scan to segment was chosen", "name the cases with --cases or --split")
    refs = [ref for ref, _ in batch]
    root = Path(os.path.commonpath([str(p.resolve()) for ref in refs for p in ref.paths]))
    prepare_output(root, output_dir, refs)
    with output_lock(output_dir):
        return _segment_locked(batch, root, output_dir, [], formats, overwrite, progress, checkpoint)


def _job(predictor: Any, output_dir: Path, formats: Sequence[str] | None, overwrite: bool) -> Job:
    return Job(
        output_dir,
        predictor.checkpoint_file,
        predictor.checkpoint_sha256,
        dict(predictor.classes),
        predictor.config.data.color,
        bool(predictor.tta),
        tuple(formats) if formats else None,
        overwrite,
        coding=coding_of(predictor.config),
        memory_budget_mb=predictor.memory_budget_mb,
        settings=dict(predictor.settings),
    )


def _segment_locked(
    batch: Sequence[tuple[ScanRef, Any]],
    input_path: Path,
    output_dir: Path,
    problems: Sequence[Problem],
    formats: Sequence[str] | None,
    overwrite: bool,
    progress: bool | None,
    checkpoint: str | None = None,
) -> BatchReport:
    from tqdm import tqdm

    jobs: dict[int, Job] = {}
    files: list[str] = []
    for _, predictor in batch:
        if id(predictor) not in jobs:
            jobs[id(predictor)] = _job(predictor, output_dir, formats, overwrite)
            files += [str(f) for f in predictor.checkpoint_files if str(f) not in files]
    first = batch[0][1] if batch else None
    label = checkpoint or (str(first.checkpoint_path) if first is not None else "")
    classes = dict(first.classes) if first is not None else {}
    report = BatchReport(str(input_path), str(output_dir), label, classes, checkpoint_files=files)
    report.records += [problem_record(problem, input_path) for problem in problems]
    show = os.isatty(2) if progress is None else progress
    for ref, predictor in tqdm(batch, desc="predict", unit="scan", disable=not show):
        try:
            report.records.append(segment_scan(ref, jobs[id(predictor)], lambda: predictor))
        except OutputUnwritable as exc:
            report.stopped = str(exc)
            break
    write_batch_reports(report, output_dir, [ref.id for ref, _ in batch])
    return report


def write_batch_manifest(report: BatchReport, output_dir: Path) -> Path:
    """predictions.json: classes, checkpoint, one record per scan and the orphans (read by `medseg evaluate`)."""
    payload: dict[str, Any] = {
        "medseg_version": __version__,
        "input": report.input,
        "checkpoint": report.checkpoint,
        "classes": report.classes,
        "counts": report.counts(),
        "records": [asdict(r) for r in report.records],
        "orphans": report.orphans,
    }
    if report.checkpoint_files:
        payload["checkpoint_files"] = report.checkpoint_files
    if report.stopped:
        payload["stopped"] = report.stopped
    return atomic_write_text(output_dir / "predictions.json", json.dumps(payload, indent=2), root=output_dir)


def write_batch_reports(
    report: BatchReport, output_dir: Path, cases: Sequence[str], reference_dir: Path | None = None
) -> list[Path]:
    """predictions.json and the review page, whatever happened to the scans.

    Orphans (ledger records of inputs that have gone) are collected here. A report that
    cannot be written is noted in ``report.stopped`` instead of raising: the masks are the
    product, the reports describe them.
    """
    from medseg.pipeline import ledger

    report.orphans = ledger.orphans(output_dir, cases)
    written: list[Path] = []
    try:
        written.append(write_batch_manifest(report, output_dir))
    except OSError as exc:
        report.stopped = (
            report.stopped + "; " if report.stopped else ""
        ) + f"predictions.json not written ({exc.strerror or exc})"
        return written
    try:
        from medseg.review import write_review  # the page people open before they trust the masks

        written.append(write_review(output_dir, reference_dir=reference_dir, progress=False))
    except (MedsegError, OSError, ValueError) as exc:
        report.stopped = (
            report.stopped + "; " if report.stopped else ""
        ) + f"review page not written ({failure_reason(exc)})"
    tidy_journal(output_dir)
    return written
