"""The ``nightly`` deployment of segment-study: served by ``medseg serve``, or deployed to a work pool by prefect.yaml.

Two ways to run it, from one config (configs/nightly.yaml) with the same rules:

- ``medseg serve`` (:func:`serve_nightly`): one long-running process on the machine that holds
  the scans and the GPU registers ``segment-study/nightly`` with the Prefect server named by
  PREFECT_API_URL and executes its runs (scheduled, or started by ``prefect deployment run``)
  in child processes. Nothing else to install; a served process keeps the code it started
  with, so restart it after upgrading medseg.
- ``prefect deploy --all`` with the repository's prefect.yaml: the deployment goes to a process
  work pool and ``prefect worker start --pool medseg`` on one or several machines that share
  the scan and output storage executes it. Its build step (:func:`nightly_build_step`) reads
  the same config, so both paths deploy the same schedule and parameters.

Either way the deployment gets:

- concurrency limit 1 with the ENQUEUE collision strategy: a second run (the schedule, a hand
  start, a second machine) waits as AwaitingConcurrencySlot until the first ends, then skips
  every scan the first wrote. The output folder's lock file (medseg.pipeline.output_lock) keeps
  ``medseg predict`` and flows of other deployments out of the same folder too;
- heartbeats every ``crash_detection.heartbeat_seconds`` in each run's process and the
  automation of medseg_flows.health that marks a run Crashed when they stop (kill -9, a machine gone),
  which also frees the concurrency slot for the next run;
- ``paused: false``. Stopping ``medseg serve`` or a worker never pauses the deployment or removes
  its schedule (Prefect's served deployments pause on shutdown by default, which silenced every
  other serve process): a run that comes due while nothing executes runs waits as Late and
  starts when one is back, and ``medseg status`` says so meanwhile.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.runner import Runner
from prefect.schedules import Cron
from prefect.settings import get_current_settings
from prefect.types.entrypoint import EntrypointType

from medseg_flows.health import ensure_crash_automation, require_server
from medseg_flows.runners import require_dask
from medseg_flows.segment_study import segment_study
from medseg_flows.settings import DEPLOYMENT_NAME, NightlyConfig, load_nightly_config, resolve_checkpoint

__all__ = [
    "ONE_RUN_AT_A_TIME",
    "check_nightly",
    "ensure_crash_detection",
    "nightly_build_step",
    "nightly_deployment",
    "nightly_values",
    "serve_nightly",
]

# One run of the deployment at a time, the others queued (not cancelled): they all write the same output folder.
ONE_RUN_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
DESCRIPTION = "Nightly batch segmentation of a folder of scans (medseg)."
TAGS = ["medseg"]


def check_nightly(config: NightlyConfig) -> dict[str, Any]:
    """Refuse a deployment that could not run: missing checkpoint or prefect-dask. Returns its parameters."""
    params = config.parameters
    resolve_checkpoint(params)
    if params.task_runner == "dask":
        require_dask()
    return params.as_deployment_parameters()


def ensure_crash_detection(config: NightlyConfig) -> str:
    """Create or update the crash automation on the server at PREFECT_API_URL ("created" / "updated")."""
    require_server(get_current_settings().api.url)
    with get_client(sync_client=True) as client:
        return ensure_crash_automation(client, config.crash_detection.crashed_after_seconds, [segment_study.name])


def nightly_deployment(config: NightlyConfig) -> RunnerDeployment:
    """segment-study/nightly as ``medseg serve`` registers it (prefect.yaml declares the same for a work pool)."""
    return segment_study.to_deployment(
        name=DEPLOYMENT_NAME,
        schedule=Cron(config.schedule.cron, timezone=config.schedule.timezone),
        parameters=check_nightly(config),
        concurrency_limit=ONE_RUN_AT_A_TIME,
        paused=False,
        description=DESCRIPTION,
        tags=TAGS,
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working directory
    )


class _NightlyRunner(Runner):
    """Prefect's Runner, stopped by SIGTERM or SIGINT through its async ``astop``.

    Prefect 3.8.8's own SIGTERM handler calls the sync face of ``stop`` inside the running event
    loop, where it only returns a coroutine that nobody awaits ("RuntimeWarning: coroutine
    'Runner.astop' was never awaited"), then exits from the signal handler without cancelling
    the runs in flight. Here the signal schedules ``astop`` on the loop: runs in flight are
    cancelled (Cancelled, never left Running), polling stops and ``start`` returns.
    """

    stop_signal: int | None = None
    _stopping: asyncio.Future | None = None

    def handle_sigterm(self, signum: int = signal.SIGTERM, *args: Any, **kwargs: Any) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # a second signal while stopping: stop now
        self.stop_signal = signum
        try:
            loop = asyncio.get_running_loop()  # the handler runs in the main thread, inside the loop
        except RuntimeError:
            raise KeyboardInterrupt from None  # not serving (yet, or any more): plain interrupt
        loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if not self.started:
            raise KeyboardInterrupt  # between registering and polling: nothing to cancel yet
        self._stopping = asyncio.ensure_future(self.astop())


def serve_nightly(config: NightlyConfig, on_ready: Callable[[UUID], None] = lambda _: None) -> int | None:
    """Register segment-study/nightly and run its flow runs until SIGTERM or SIGINT (blocks).

    Needs a Prefect server that outlives this process (PREFECT_API_URL); a temporary one
    would take the schedule with it. Calls on_ready(deployment id) once registered and
    returns the signal that stopped it (None if the runner stopped by itself).
    """
    deployment = nightly_deployment(config)  # checks the checkpoint before touching the server
    ensure_crash_detection(config)
    runner = _NightlyRunner(
        name=f"medseg-serve-{socket.gethostname()}",
        heartbeat_seconds=config.crash_detection.heartbeat_seconds,  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of each run
        pause_on_shutdown=False,
        limit=1,
    )
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    async def serve() -> None:
        on_ready(await runner.aadd_deployment(deployment))
        signal.signal(signal.SIGINT, runner.handle_sigterm)  # Runner.start installs it for SIGTERM
        await runner.start()

    try:
        asyncio.run(serve())
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return runner.stop_signal


def nightly_build_step(config: str = "configs/nightly.yaml") -> dict[str, Any]:
    """prefect.yaml build step: the nightly config, checked as ``medseg serve`` checks it; the crash automation.

    Returns the values prefect.yaml templates into the deployment ({{ nightly.cron }},
    {{ nightly.parameters.input_dir }}, ...): every flow parameter (None where the config
    leaves it unset), the schedule, and the heartbeat interval for the runs' environment.
    A relative config path resolves against the folder ``prefect deploy`` runs in.
    """
    nightly = load_nightly_config(Path(config))
    values = nightly_values(nightly)
    ensure_crash_detection(nightly)
    return values


def nightly_values(config: NightlyConfig) -> dict[str, Any]:
    """The checked config as the values prefect.yaml templates in (all JSON-ready; the heartbeat a string, as
    an environment variable is)."""
    check_nightly(config)
    return {
        "cron": config.schedule.cron,
        "timezone": config.schedule.timezone,
        "parameters": config.parameters.model_dump(mode="json"),
        "heartbeat_seconds": str(config.crash_detection.heartbeat_seconds),
    }
