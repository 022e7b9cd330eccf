"""Segment one scan: the one per-scan path of `medseg predict` and the segment-study flow.

Skip if the ledger says the masks are intact, else load → check the mask names → predict →
record the intent → export → record. A file at a mask's name that the ledger does not name
as this case's (a user's own segmentation) fails the scan unless the job overwrites; the
ledger record written before the export means a run killed mid-write leaves masks the next
run knows as its own, and redoes. Any problem of this scan becomes this scan's failure with
one sentence (an unexpected one also leaves its traceback in ``OUTPUT/logs/``); a transient
input read is retried; an output folder that takes no more raises `OutputUnwritable`, which
stops the batch.
"""

from __future__ import annotations

import errno
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medseg import __version__
from medseg.errors import ExportError, MedsegError, ScanError
from medseg.files import atomic_write_text, contained_path, safe_part
from medseg.ingest import LoadOptions, Problem, ScanRef, case_id, load
from medseg.pipeline.output import (
    OUTPUT_ERRNOS,
    PROBE_MARGIN_BYTES,
    OutputUnwritable,
    check_reads_outside,
    check_room,
    file_size,
)

__all__ = [
    "RETRY_DELAYS",
    "SKIP_REASON",
    "CaseRecord",
    "Job",
    "coding_of",
    "failure_reason",
    "problem_record",
    "segment_scan",
]

SKIP_REASON = "unchanged input content, checkpoint and settings; masks intact (no model work)"
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EINTR,
        errno.EBUSY,
        errno.ECONNRESET,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
    }
)
RETRY_DELAYS = (2.0, 10.0)  # seconds before the 1st and 2nd retry of a transient input read


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
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """What every scan of a batch shares: small, immutable, cheap to send to a worker process."""

    output_dir: Path
    checkpoint: Path  # the file, not the run folder (an ensemble: its first member's)
    checkpoint_sha256: str  # the file's sha256 (an ensemble: one key over every member's, `Ensemble.checkpoint_sha256`)
    classes: dict[str, int]
    color: str
    tta: bool
    formats: tuple[str, ...] | None = None
    overwrite: bool = False
    device: str = "auto"  # where a worker loads its model (the CLI passes its Predictor instead)
    coding: dict[str, Any] | None = None  # data.classes_coding of the checkpoint's config, for DICOM SEG
    memory_budget_mb: float | None = None  # per scan, checked from headers before decoding (None: default)
    retry_delays: tuple[float, ...] = field(default_factory=lambda: RETRY_DELAYS)
    settings: dict[str, Any] = field(default_factory=dict)  # Predictor.settings: in the skip key

    def formats_for(self, ref: ScanRef) -> tuple[str, ...]:
        from medseg.export import default_formats

        return tuple(self.formats or default_formats(ref.kind))


def coding_of(config: Any) -> dict[str, Any] | None:
    """The config's ``data.classes_coding`` as plain data (it travels in a Job to worker processes)."""
    coding = config.data.classes_coding
    return None if coding is None else {name: entry.model_dump(mode="json") for name, entry in coding.items()}


def failure_reason(exc: BaseException) -> str:
    """A medseg error already names file, problem and fix; an OSError its file and what the system said."""
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc} (the file changed or went away while the batch ran?)"
    return f"{type(exc).__name__}: {exc}"


def problem_record(problem: Problem, input_root: Path) -> CaseRecord:
    """The failed record of an input discovery could not use, under the id the file would have had.

    The reason names the file(s) as every scan error does: the id alone (``ct/IM0001``) does not
    say which file of a series, nor its extension.
    """
    path = Path(problem.paths[0])
    reason = str(ScanError(problem.paths, problem.reason))
    return CaseRecord(case_id(path, input_root), "unknown", str(path), "failed", reason=reason)


def _check_still_writable(job: Job, ref: ScanRef) -> None:
    """Before a scan's model work: the folder still takes writes and has room for this scan's masks.

    Why: once a disk is full or remounted read-only mid-batch, every further scan would
    compute its prediction only to fail at export; in the flow the scans run in parallel,
    so each stops here instead, cheaply, with the same sentence.
    """
    if not os.access(job.output_dir, os.W_OK):
        raise OutputUnwritable(
            f"output folder {job.output_dir}: no longer writable (read-only or permission "
            "withdrawn); the batch stopped, masks written so far are kept; fix it, then rerun the "
            "same command to resume"
        )
    check_room(job.output_dir, sum(file_size(p) for p in ref.paths) + PROBE_MARGIN_BYTES // 4, f"scan {ref.id}")


def _log_traceback(output_dir: Path, case: str, exc: BaseException) -> Path | None:
    """OUTPUT/logs/<case>.traceback.txt for an error medseg did not expect (None if that cannot be written)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        path = contained_path(output_dir, safe_part(case.replace("/", "__")), ".traceback.txt", folder="logs")
        return atomic_write_text(path, f"medseg {__version__}, case {case}\n\n{text}", root=output_dir)
    except (OSError, MedsegError):
        return None


def _load_with_retries(ref: ScanRef, job: Job) -> Any:
    attempt = 0
    while True:
        try:
            return load(ref, LoadOptions(color=job.color, memory_budget_mb=job.memory_budget_mb))
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS or attempt >= len(job.retry_delays):
                raise
            time.sleep(job.retry_delays[attempt])
            attempt += 1


def _refuse_foreign(output_dir: Path, case: str, targets: list[Path], overwrite: bool) -> None:
    """ExportError if a mask name of ``case`` is taken by a file (or link) no ledger record of it names, unless
    ``overwrite``; or, overwrite or not, by a folder (a user's folder is never replaced by a mask)."""
    from medseg.pipeline import ledger

    folders = [p for p in targets if p.is_dir() and not p.is_symlink()]
    if folders:
        raise ExportError(
            f"{folders[0]}: is a folder where a mask of {case} goes, and medseg never replaces a folder; "
            "move it away and rerun"
        )
    if overwrite:
        return
    ours = ledger.recorded_paths(output_dir, case)
    taken = [p for p in targets if os.path.lexists(p) and ledger.relative_path(output_dir, p) not in ours]
    if taken:
        more = f" (and {len(taken) - 1} more of this scan's mask names)" if len(taken) > 1 else ""
        raise ExportError(
            f"{taken[0]}: exists and medseg did not write it{more}; move it away, "
            "or rerun with --overwrite to replace it"
        )


def segment_scan(ref: ScanRef, job: Job, predictor: Callable[[], Any]) -> CaseRecord:
    """Load → check the mask names → predict → export → record one scan, unless its masks are intact.

    Intact masks: no model work. The mask names are checked once the scan is read (PNG slice
    names follow its grid) and before the model is loaded or run.

    ``predictor`` returns the Predictor, called only when the scan needs one (a worker
    loads its model on first use). Never raises for a problem of this scan; raises
    `OutputUnwritable` when the output folder can take no more.
    """
    from medseg.pipeline import ledger
    from medseg.export import export_mask, mask_paths

    start = time.monotonic()
    record = CaseRecord(ref.id, ref.kind, str(ref.path), "written")
    try:
        key = ledger.scan_key(ref, job.checkpoint_sha256, job.tta, job.formats_for(ref), job.settings)
        if not job.overwrite:
            outputs = ledger.find_outputs(job.output_dir, ref.id, key)
            if outputs is not None:
                record.status, record.reason = "skipped", SKIP_REASON
                record.outputs = [str(p) for p in outputs]
                return record
        check_reads_outside(ref, job.output_dir)
        _check_still_writable(job, ref)
        scan = _load_with_retries(ref, job)
        formats = job.formats_for(ref)
        targets = [p for paths in mask_paths(job.output_dir, ref, scan.geometry.shape, formats).values() for p in paths]
        _refuse_foreign(job.output_dir, ref.id, targets, job.overwrite)
        prediction = predictor().predict(scan)
        refused: list[str] = []  # a DICOM object this series cannot have; the other masks are still written
        ledger.intend(job.output_dir, ref.id, key, targets, str(ref.path))  # before any mask: a kill leaves it ours
        try:
            outputs = export_mask(
                prediction.mask, scan, job.output_dir, job.classes, formats, job.coding, notes=refused
            )
        except BaseException:
            ledger.abandon(job.output_dir, ref.id)  # no record of masks that were never written
            raise
        ledger.remember(job.output_dir, ref.id, key, outputs, str(ref.path))
        record.outputs = [str(p) for p in outputs]
        record.notes = list(scan.notes) + list(scan.geometry.notes) + refused
    except OutputUnwritable:
        raise
    except MedsegError as exc:
        record.status, record.reason = "failed", str(exc)
    except OSError as exc:
        if exc.errno in OUTPUT_ERRNOS and _is_under(exc.filename, job.output_dir):
            raise OutputUnwritable(
                f"output folder {job.output_dir}: {exc.strerror} while writing {exc.filename or 'into it'}; "
                "the batch stopped, masks written so far are kept; free space or fix "
                "permissions, then rerun the same command to resume"
            ) from None
        record.status, record.reason = "failed", failure_reason(exc)
    except Exception as exc:  # noqa: BLE001 - one scan's surprise must not stop the batch
        log = _log_traceback(job.output_dir, ref.id, exc)
        where = f"; traceback in {log}" if log else ""
        record.status, record.reason = "failed", f"unexpected {failure_reason(exc)}{where}"
    record.seconds = round(time.monotonic() - start, 3)
    return record


def _is_under(filename: Any, folder: Path) -> bool:
    if not filename:
        return True  # an OSError without a file name during export came from the output side
    try:
        path = Path(os.fsdecode(filename)).resolve()
    except (TypeError, ValueError, OSError):
        return False
    root = folder.resolve()
    return path == root or root in path.parents
