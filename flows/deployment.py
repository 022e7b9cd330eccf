"""The ``nightly`` deployment of segment-study, served by this process (``medseg serve``).

Why ``flow.serve`` and not a work pool and worker: one long-running process on the
machine that holds the scans and the GPU is the whole deployment; there is no image to
build and no second service to run. It registers ``segment-study/nightly`` with the
Prefect server named by PREFECT_API_URL, with the cron schedule and default parameters
of the nightly config, then polls for runs (scheduled or started by
``prefect deployment run segment-study/nightly``) and executes each in a child process.
Stopping it pauses the schedule; a served process keeps the code it started with, so
restart it after upgrading medseg.
"""

from __future__ import annotations

from typing import Any

from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.runners import require_dask
from flows.segment_study import segment_study
from flows.settings import DEPLOYMENT_NAME, NightlyConfig, resolve_checkpoint

__all__ = ["check_nightly", "serve_nightly"]


def check_nightly(config: NightlyConfig) -> dict[str, Any]:
    """Refuse to serve a deployment that could not run: missing checkpoint or prefect-dask."""
    params = config.parameters
    resolve_checkpoint(params)
    if params.task_runner == "dask":
        require_dask()
    return params.as_deployment_parameters()


def serve_nightly(config: NightlyConfig) -> None:
    """Register segment-study/nightly and run its flow runs until interrupted (blocks)."""
    parameters = check_nightly(config)
    segment_study.serve(
        name=DEPLOYMENT_NAME,
        schedule=Cron(config.schedule.cron, timezone=config.schedule.timezone),
        parameters=parameters,
        description="Nightly batch segmentation of a folder of scans (medseg).",
        tags=["medseg"],
        limit=1,  # runs of one output folder must not overlap
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working directory
    )
