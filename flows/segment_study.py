"""The ``segment-study`` flow: segment (and score) every scan in a folder, incrementally.

Shape of a run::

    segment-study                       checks parameters, picks the task runner
      prepare-job                       checkpoint → hash, classes (once per run)
      discover-scans                    folder → ScanRefs (+ reference masks)
      segment-scan × N  (task runner)   load → predict → export, or skip if up to date
      evaluate-scan × N (task runner)   Dice/IoU of each written mask vs its reference
      publish-reports                   predictions.json, metrics.csv/json, review.html, artifacts

The per-scan tasks go to a task runner chosen by the run's parameters (threads or
Dask), entered here and handed the tasks directly; Prefect fixes a flow's own runner
when the flow is defined. No subflow: every flow run is API calls at its start and end,
and a run's local work must not wait on the API (medseg_flows.api_guard).

Final state: Completed when every scan has its mask (and, with a reference folder,
its scores). Failed when any scan failed or could not be scored, but only after every
other scan ran and every report and artifact was written; the state message gives the
counts, and the summary artifact and predictions.json list each failure with its reason.
A bad input therefore never hides behind a green run, and never stops the others.
Two things do stop a run, each with one sentence as its Failed message and no traceback:
a refusal before any scan (input and output overlap, an output that is a file or
read-only, another run holding the folder, a checkpoint that cannot be read), and an
output folder that stops taking writes mid-batch (full, read-only, permission
withdrawn): no more scans are handed out, the masks written so far are kept, and the
reports are written if the folder still takes them.
"""

# No `from __future__ import annotations` here: Prefect builds the parameter model from the
# signature, and a served run unpickles the flow in a child process where string annotations
# such as "MaskFormat" cannot be resolved.

from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner
from pydantic import ValidationError

from medseg.config import describe_validation_error
from medseg.errors import ConfigError, MedsegError
from medseg.ingest import ScanRef
from medseg.pipeline import CaseRecord, check_disjoint, output_lock, problem_record

from medseg_flows.api_guard import GUARD, quiet_outage_noise
from medseg_flows.reporting import Batch, Outcome, Summary, publish_reports
from medseg_flows.runners import build_task_runner, in_flight
from medseg_flows.settings import FlowParameters, resolve_checkpoint
from medseg_flows.tasks import (
    OUTPUT_STOPPED,
    Inventory,
    Job,
    discover_scans,
    evaluate_scan,
    failure_reason,
    prepare_job,
    segment_scan,
)

__all__ = ["ScansFailed", "segment_study", "segment_scans"]

MaskFormat = Literal["nifti", "dicom-seg", "rtstruct", "tiff", "png"]


class ScansFailed(MedsegError):
    """Raised by a direct call of the flow when some scans failed (after all of them ran)."""


@flow(name="segment-study", validate_parameters=True)
def segment_study(
    input_dir: Path,
    output_dir: Path,
    checkpoint: Path | None = None,
    config: Path | None = None,
    reference_dir: Path | None = None,
    tta: bool | None = None,
    overwrite: bool = False,
    device: str = "auto",
    formats: list[MaskFormat] | None = None,
    task_runner: Literal["threads", "dask"] = "threads",
    workers: int | None = None,
    dask_address: str | None = None,
) -> Summary | State:
    """Segment every scan under input_dir into output_dir; score against reference_dir if given.

    Args:
        input_dir: folder tree of scans (DICOM series, NIfTI, TIFF/PNG stacks).
        output_dir: where masks and reports go (outside input_dir).
        checkpoint: run folder (best.pt) or checkpoint file; or
        config: an experiment config whose run folder holds the checkpoint.
        reference_dir: reference masks named by case id → metrics.csv/json and Dice/IoU artifact.
        tta: test-time augmentation; None keeps the checkpoint's setting.
        overwrite: redo every scan even if its masks are up to date, and replace files at mask names
            that medseg did not write (without it, such a scan fails naming the file).
        device: auto (CUDA if present), cpu, cuda, cuda:N.
        formats: mask formats; None: the default per input kind (as `medseg predict`).
        task_runner: threads (one process, one model) or dask (pip install 'medseg[dask]').
        workers: threads, or local Dask worker processes (default 2; one per GPU with Dask on GPUs).
        dask_address: an existing Dask scheduler instead of a local cluster.

    Returns the run Summary when every scan succeeded; otherwise a Failed state (a direct
    call raises ScansFailed) once all scans ran and all reports were written.
    """
    try:
        params = _validated(dict(locals()))
    except ConfigError as exc:
        return _refused(exc)
    GUARD.start_run(str(params.output_dir))
    quiet_outage_noise()
    with ExitStack() as held:
        try:  # refusals before any scan: one sentence as the run's Failed message, no traceback
            runner = build_task_runner(params.task_runner, params.workers, params.dask_address)  # prefect-dask?
            checkpoint_file = resolve_checkpoint(params)
            _check_folders(params)
            held.enter_context(output_lock(params.output_dir))  # one run per output folder, flows and CLI alike
        except MedsegError as exc:
            return _refused(exc)
        prepared = prepare_job(
            checkpoint_file,
            params.input_dir,
            params.output_dir,
            params.device,
            params.tta,
            params.formats,
            params.overwrite,
            return_state=True,
        )
        if not prepared.is_completed():
            error = prepared.result(raise_on_failure=False)  # an exception if it crashed; None if it refused
            return _refused(error if isinstance(error, BaseException) else MedsegError(prepared.message))
        job: Job = prepared.result()
        window = in_flight(params.task_runner, params.workers, params.dask_address)
        batch = segment_scans(runner, params.input_dir, params.reference_dir, job, window)
        summary = publish_reports(params.input_dir, params.reference_dir, job, batch)
    if summary.ok:
        return summary
    message = summary.failure_message()
    return Failed(message=message, data=ScansFailed(message))


def _refused(exc: BaseException) -> State:
    """The run ends Failed with the refusal's sentence; a direct call raises the refusal itself."""
    get_run_logger().error("segment-study: %s", exc)
    return Failed(message=str(exc), data=exc)


def segment_scans(runner: TaskRunner, input_dir: Path, reference_dir: Path | None, job: Job, window: int = 4) -> Batch:
    """Discover, then one segment-scan task per scan on ``runner``, each scored as soon as its mask is written.

    The runner (a Dask cluster included) is started only when there is a scan to give it.
    At most ``window`` scans are handed out at once, so that when the output folder stops
    taking writes the batch stops there, as `medseg predict` does: the scans not yet
    handed out are not tried, and ``batch.stopped`` says why.
    """
    inventory = discover_scans(input_dir, reference_dir)
    logger = get_run_logger()
    batch = Batch(references=list(inventory.references), cases=[ref.id for ref in inventory.scans])
    for problem in inventory.problems:
        record = problem_record(problem, input_dir)
        logger.error("%s: unusable input: %s", record.case, problem.reason)
        batch.outcomes.append(Outcome(record))
    for problem in inventory.reference_problems:
        assert reference_dir is not None
        case = problem_record(problem, reference_dir).case
        batch.reference_failures[case] = f"reference {problem.paths[0]}: {problem.reason}"

    if not inventory.scans:
        return batch
    with runner:
        _run_scans(runner, inventory, job, batch, window)
    return batch


def _run_scans(runner: TaskRunner, inventory: Inventory, job: Job, batch: Batch, window: int) -> None:
    waiting = deque(inventory.scans)
    running: dict[PrefectFuture, ScanRef] = {}
    outcomes: dict[str, Outcome] = {}
    scoring = {}
    while waiting or running:
        while waiting and len(running) < window and not batch.stopped:
            ref = waiting.popleft()
            running[runner.submit(segment_scan, {"ref": ref, "job": job})] = ref
        if not running:
            break
        future = next(as_completed(list(running)))
        ref = running.pop(future)
        future.wait()
        state = future.state
        if not state.is_completed():
            if state.name == OUTPUT_STOPPED:  # the folder, not the scan: hand out no more scans
                batch.stopped = batch.stopped or (state.message or "the output folder took no more writes")
            else:
                outcomes[ref.id] = Outcome(CaseRecord(ref.id, ref.kind, str(ref.path), "failed", reason=_reason(state)))
            continue
        record: CaseRecord = state.result()
        outcomes[ref.id] = Outcome(record)
        if ref.id in inventory.references:
            scoring[ref.id] = runner.submit(
                evaluate_scan,
                {"record": record, "reference": inventory.references[ref.id], "classes": job.classes},
            )
    for case, future in scoring.items():
        future.wait()
        state = future.state
        if state.is_completed():
            outcomes[case].scores = state.result()
        else:
            outcomes[case].evaluation_failure = _reason(state)
    batch.outcomes += [outcomes[ref.id] for ref in inventory.scans if ref.id in outcomes]
    batch.not_done = [ref.id for ref in inventory.scans if ref.id not in outcomes]


def _validated(arguments: dict[str, Any]) -> FlowParameters:
    try:
        return FlowParameters(**arguments)
    except ValidationError as exc:
        raise describe_validation_error(exc, "segment-study parameters") from None


def _check_folders(params: FlowParameters) -> None:
    """Fail before any work when the folders cannot work, not once per scan."""
    if not params.input_dir.is_dir():
        raise ConfigError(f"input_dir {params.input_dir}: not a folder; point it at the folder of scans")
    if params.reference_dir is not None and not params.reference_dir.is_dir():
        raise ConfigError(f"reference_dir {params.reference_dir}: not a folder of reference masks")
    check_disjoint(params.input_dir, params.output_dir)


def _reason(state: State) -> str:
    """Why a task did not complete: its exception (retries exhausted, crash) or its Failed message."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        return failure_reason(exc)
    return state.message or state.name or "failed"
