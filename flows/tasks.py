"""The tasks of segment-study: Prefect wiring around medseg.pipeline, which does the per-scan work.

No arrays cross a task boundary: a mask goes from the model to its file inside one task,
and evaluation reads it back from that file, so a task result stays a few hundred bytes
whether it travels through a thread pool or a Dask cluster.

Failures follow medseg's one rule (medseg.pipeline): a scan medseg cannot read or segment
ends its own task in a Failed state whose message is the reason; a transient input read is
retried inside the pipeline; an output folder that takes no more ends the scan's task in a
Cancelled state named OUTPUT_STOPPED (not done, rather than failed), and the flow stops handing out scans (as
`medseg predict` stops its loop). A checkpoint that cannot be read fails prepare-job with
its one sentence, which the flow turns into its own Failed state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed, State

from medseg.training.checkpoint import load_checkpoint
from medseg.errors import MedsegError
from medseg.evaluation.evaluate import MASK_OPTIONS, evaluate_case
from medseg.files import sha256_file
from medseg.inference.predictor import inference_settings
from medseg.ingest import Problem, ScanRef, discover, load, ref_for_path
from medseg.pipeline import CaseRecord, Job, OutputUnwritable, coding_of, failure_reason, prepare_output
from medseg.pipeline import segment_scan as segment_one

from medseg_flows.api_guard import quiet_outage_noise
from medseg_flows.model_cache import get_predictor

OUTPUT_STOPPED = "OutputUnwritable"  # the name of a segment-scan's end state when the output took no more

__all__ = [
    "OUTPUT_STOPPED",
    "Inventory",
    "Job",
    "discover_scans",
    "evaluate_scan",
    "failure_reason",
    "prepare_job",
    "segment_scan",
]


@dataclass
class Inventory:
    """What discovery found: scans to segment, unusable inputs, and reference masks by case id."""

    scans: list[ScanRef]
    problems: list[Problem]
    references: dict[str, ScanRef] = field(default_factory=dict)
    reference_problems: list[Problem] = field(default_factory=list)


@task(name="prepare-job", cache_policy=NO_CACHE)
def prepare_job(
    checkpoint: Path,
    input_dir: Path,
    output_dir: Path,
    device: str,
    tta: bool | None,
    formats: list[str] | None,
    overwrite: bool,
) -> Job | State:
    """Check the output folder and read what the run needs from the checkpoint once.

    The output is checked as `medseg predict` checks it (outside the inputs, a folder,
    writable, room for the batch) and medseg's own temporary files of a killed run are
    cleared (finished masks stay; nothing medseg's journal does not name is touched).
    """
    try:
        prepare_output(input_dir, output_dir)  # room estimated from the input tree's file sizes
        state = load_checkpoint(checkpoint)
    except MedsegError as exc:  # a refusal, not a crash: one sentence (as data, Prefect would log a traceback)
        return Failed(message=str(exc))
    return Job(
        output_dir=output_dir,
        checkpoint=checkpoint,
        checkpoint_sha256=sha256_file(checkpoint),
        classes=state.classes,
        color=state.config.data.color,
        tta=state.config.infer.tta if tta is None else tta,
        formats=tuple(formats) if formats else None,
        overwrite=overwrite,
        device=device,
        coding=coding_of(state.config),
        settings=inference_settings(state.config),  # the worker's Predictor takes the checkpoint's settings
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
    logger.info(
        "%d scan(s) in %s%s",
        len(found.scans),
        input_dir,
        f"; {len(found.problems)} unusable input(s)" if found.problems else "",
    )
    if not found.scans and not found.problems:
        logger.warning("no scan in %s: nothing to segment (is the folder or share mounted?)", input_dir)
    return inventory


@task(name="segment-scan", task_run_name="segment {ref.id}", cache_policy=NO_CACHE)
def segment_scan(ref: ScanRef, job: Job) -> CaseRecord | State:
    """medseg.pipeline.segment_scan on this worker's Predictor (loaded on first use, shared by its scans)."""
    quiet_outage_noise()  # a Dask worker is a process of its own, with its own Prefect client and logging
    logger = get_run_logger()
    try:
        record = segment_one(ref, job, lambda: get_predictor(job.checkpoint, job.device, job.tta))
    except OutputUnwritable as exc:  # the flow stops the batch; this scan is not done, not failed
        logger.error("%s: %s", ref.id, exc)
        return Cancelled(message=str(exc), name=OUTPUT_STOPPED)  # Failed: Prefect would log it with a traceback
    if record.status == "failed":
        logger.error("%s: failed: %s", ref.id, record.reason)
        return Failed(message=record.reason)
    if record.status == "skipped":
        logger.info("%s: skipped, %s", ref.id, record.reason)
    else:
        logger.info(
            "%s: written in %.1f s: %s", ref.id, record.seconds, ", ".join(Path(p).name for p in record.outputs)
        )
    return record


@task(name="evaluate-scan", task_run_name="evaluate {record.case}", cache_policy=NO_CACHE)
def evaluate_scan(record: CaseRecord, reference: ScanRef, classes: dict[str, int]) -> dict[str, Any] | State:
    """Dice and IoU of the mask as written on disk against its reference (what `medseg evaluate` scores)."""
    mask = next((Path(p) for p in record.outputs if not str(p).endswith(".dcm")), None)  # not SEG or RTSTRUCT
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
