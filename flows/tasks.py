"""The tasks of segment-study: each calls medseg functions and returns paths and small records.

No arrays cross a task boundary: a mask goes from the model to its file inside one task,
and evaluation reads it back from that file, so a task result stays a few hundred bytes
whether it travels through a thread pool or a Dask cluster.

Failures: a scan medseg cannot read or segment ends its own task in a Failed state
whose message is the reason (no retry: it would fail again); an OSError (a network
share that hiccups, a disk briefly full) is retried twice before the task fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import Failed, State

from medseg.batch import CaseRecord
from medseg.checkpoint import load_checkpoint
from medseg.config import config_from_dict
from medseg.errors import MedsegError
from medseg.evaluate import MASK_OPTIONS, evaluate_case
from medseg.export import export_mask, remove_stale_parts
from medseg.io import LoadOptions, Problem, ScanRef, discover, load, ref_for_path

from flows import ledger
from flows.model_cache import get_predictor

__all__ = ["Inventory", "Job", "discover_scans", "evaluate_scan", "failure_reason", "prepare_job", "segment_scan"]

RETRY_DELAYS = [2, 10]  # seconds before the 1st and 2nd retry of a transient I/O error
SKIP_REASON = "unchanged input content, checkpoint and settings; masks present (no model work)"


@dataclass(frozen=True)
class Job:
    """What every per-scan task needs: small, immutable, cheap to send to a worker."""

    output_dir: Path
    checkpoint: Path  # the file, not the run folder
    checkpoint_sha256: str
    classes: dict[str, int]
    color: str
    device: str
    tta: bool  # effective: the run's choice, else the checkpoint's
    formats: tuple[str, ...] | None
    overwrite: bool


@dataclass
class Inventory:
    """What discovery found: scans to segment, unusable inputs, and reference masks by case id."""

    scans: list[ScanRef]
    problems: list[Problem]
    references: dict[str, ScanRef] = field(default_factory=dict)
    reference_problems: list[Problem] = field(default_factory=list)


def _is_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry only I/O errors; a bad scan fails the same way every time."""
    return isinstance(state.data, OSError)


def failure_reason(exc: BaseException) -> str:
    """A medseg error already names file, problem and fix; anything else gets its type."""
    return str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"


@task(name="prepare-job", cache_policy=NO_CACHE)
def prepare_job(
    checkpoint: Path, output_dir: Path, device: str, tta: bool | None, formats: list[str] | None, overwrite: bool
) -> Job:
    """Read what the run needs from the checkpoint once: its hash, classes, colour handling, TTA default.

    Also clears the temporary files a killed run left in output_dir (finished masks stay).
    """
    remove_stale_parts(output_dir)
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"], source=f"{checkpoint} (config)")
    return Job(
        output_dir=output_dir,
        checkpoint=checkpoint,
        checkpoint_sha256=ledger.file_sha256(checkpoint),
        classes=dict(state["classes"]),
        color=config.data.color,
        device=device,
        tta=config.infer.tta if tta is None else tta,
        formats=tuple(formats) if formats else None,
        overwrite=overwrite,
    )


@task(name="discover-scans", cache_policy=NO_CACHE)
def discover_scans(input_dir: Path, reference_dir: Path | None = None) -> Inventory:
    """Find the scans (and reference masks) once, up front, so each scan becomes one task."""
    found = discover(input_dir)
    inventory = Inventory(found.scans, found.problems)
    if reference_dir is not None:
        refs = discover(reference_dir)
        inventory.references = {ref.id: ref for ref in refs.scans}
        inventory.reference_problems = refs.problems
    logger = get_run_logger()
    logger.info("%d scan(s) in %s%s", len(found.scans), input_dir,
                f"; {len(found.problems)} unusable input(s)" if found.problems else "")
    if not found.scans and not found.problems:
        logger.warning("no scan in %s: nothing to segment (is the folder or share mounted?)", input_dir)
    return inventory


@task(
    name="segment-scan",
    task_run_name="segment {ref.id}",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_is_transient,
    cache_policy=NO_CACHE,
)
def segment_scan(ref: ScanRef, job: Job) -> CaseRecord | State:
    """Load → predict → export one scan, unless its masks are up to date (then no model work)."""
    logger = get_run_logger()
    start = time.monotonic()
    record = CaseRecord(ref.id, ref.kind, str(ref.path), "written")
    key = ledger.scan_key(ref, job.checkpoint_sha256, job.tta, job.formats)
    if not job.overwrite:
        outputs = ledger.find_outputs(job.output_dir, ref.id, key)
        if outputs is not None:
            record.status, record.reason = "skipped", SKIP_REASON
            record.outputs = [str(p) for p in outputs]
            logger.info("%s: skipped, %s", ref.id, SKIP_REASON)
            return record
    try:
        predictor = get_predictor(job.checkpoint, job.device, job.tta)
        scan = load(ref, LoadOptions(color=job.color))
        prediction = predictor.predict(scan)
        outputs = export_mask(prediction.mask, scan, job.output_dir, job.classes, job.formats)
    except OSError:
        raise  # transient until proven otherwise: the task's retries take it
    except (MedsegError, ValueError, RuntimeError) as exc:
        reason = failure_reason(exc)
        logger.error("%s: failed: %s", ref.id, reason)
        return Failed(message=reason)
    ledger.remember(job.output_dir, ref.id, key, outputs)
    record.outputs = [str(p) for p in outputs]
    record.seconds = round(time.monotonic() - start, 3)
    logger.info("%s: written in %.1f s: %s", ref.id, record.seconds, ", ".join(Path(p).name for p in outputs))
    return record


@task(name="evaluate-scan", task_run_name="evaluate {record.case}", cache_policy=NO_CACHE)
def evaluate_scan(record: CaseRecord, reference: ScanRef, classes: dict[str, int]) -> dict[str, Any] | State:
    """Dice and IoU of the mask as written on disk against its reference (what `medseg evaluate` scores)."""
    mask = next((Path(p) for p in record.outputs if not str(p).endswith(".seg.dcm")), None)
    try:
        if mask is None:
            raise MedsegError(f"{record.case}: no NIfTI/TIFF/PNG mask to score (only {record.outputs})")
        prediction = load(ref_for_path(mask), MASK_OPTIONS)
        truth = load(reference, MASK_OPTIONS)
        return evaluate_case(prediction, truth, classes)
    except (MedsegError, OSError, ValueError, RuntimeError) as exc:
        reason = failure_reason(exc)
        get_run_logger().error("%s: cannot score: %s", record.case, reason)
        return Failed(message=reason)
