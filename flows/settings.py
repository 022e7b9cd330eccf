"""What a segment-study run is asked to do, and the nightly config that names its defaults.

``FlowParameters`` is the one place the run parameters are validated: the flow checks
its arguments with it (so a deployment run with ``--param`` gets the same rules) and
``configs/nightly.yaml`` is read into it. Like every medseg config, the YAML is data
validated by pydantic: unknown keys and bad values are errors that name the file and
the dotted key, and relative paths resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from medseg.training.checkpoint import CheckpointError, checkpoint_file
from medseg.config import (
    ConfigPath,
    Section,
    apply_overrides,
    describe_validation_error,
    load_config,
    read_yaml_file,
)
from medseg.errors import ConfigError

__all__ = [
    "DEPLOYMENT_NAME",
    "CrashDetection",
    "FlowParameters",
    "NightlyConfig",
    "ScheduleConfig",
    "checkpoint_file",
    "load_nightly_config",
    "resolve_checkpoint",
]

DEPLOYMENT_NAME = "nightly"
MaskFormat = Literal["nifti", "dicom-seg", "rtstruct", "tiff", "png"]


class FlowParameters(Section):
    """The parameters of one ``segment-study`` run (the flow's own signature, validated).

    checkpoint: a run folder (best.pt, else latest.pt) or a checkpoint file; or
    config: an experiment config whose run folder (output_dir/name) holds it. One of the two.
    tta: None keeps the checkpoint's own setting. formats: None writes each input kind's
    default mask formats, as ``medseg predict`` does. workers: threads (threads) or worker
    processes (local Dask cluster); None picks a default. dask_address: an existing
    Dask scheduler, e.g. tcp://10.0.0.5:8786 (task_runner dask only).
    """

    input_dir: ConfigPath
    output_dir: ConfigPath
    checkpoint: ConfigPath | None = None
    config: ConfigPath | None = None
    reference_dir: ConfigPath | None = None
    tta: bool | None = None
    overwrite: bool = False
    device: str = "auto"
    formats: list[MaskFormat] | None = None
    task_runner: Literal["threads", "dask"] = "threads"
    workers: int | None = Field(None, ge=1)
    dask_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "FlowParameters":
        if (self.checkpoint is None) == (self.config is None):
            raise ValueError(
                "give either 'checkpoint' (a run folder or .pt file) or 'config' (an experiment config), "
                "not both or neither"
            )
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("'dask_address' needs task_runner: dask")
        if self.dask_address and self.workers is not None:
            raise ValueError(
                "'workers' sizes a local Dask cluster; an existing cluster at 'dask_address' has its own workers"
            )
        return self

    def as_deployment_parameters(self) -> dict[str, Any]:
        """JSON-ready defaults for the deployment (unset values fall back to the flow's defaults)."""
        return self.model_dump(mode="json", exclude_none=True)


class ScheduleConfig(Section):
    """When the nightly run starts: a cron line in a time zone (IANA name)."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> "ScheduleConfig":
        """Checked by Prefect's own schedule model, so what validates here is what the server accepts."""
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return self


class CrashDetection(Section):
    """How a run whose process died (kill -9, a machine that went down) is told from one that is working.

    Every segment-study run reports a heartbeat to the Prefect server each ``heartbeat_seconds``
    (Prefect's PREFECT_FLOWS_HEARTBEAT_FREQUENCY; 30 s is its minimum). A Prefect automation marks
    the run Crashed when no heartbeat came for ``crashed_after_seconds``, which frees the
    deployment's concurrency slot for the next run. The window must hold at least two heartbeats,
    so one late heartbeat on a busy machine does not crash a live run.
    """

    heartbeat_seconds: int = Field(30, ge=30, le=3600)
    crashed_after_seconds: int = Field(90, ge=60, le=86400)

    @model_validator(mode="after")
    def _window_holds_two_heartbeats(self) -> "CrashDetection":
        if self.crashed_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"crashed_after_seconds ({self.crashed_after_seconds}) must be at least twice heartbeat_seconds "
                f"({self.heartbeat_seconds}), or a live run whose heartbeat is late would be marked Crashed"
            )
        return self


class NightlyConfig(Section):
    """configs/nightly.yaml: the schedule, the default parameters and crash detection of segment-study/nightly."""

    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    parameters: FlowParameters
    crash_detection: CrashDetection = Field(default_factory=CrashDetection)


def load_nightly_config(path: Path | str, overrides: Sequence[str] = ()) -> NightlyConfig:
    """Read, override (``parameters.checkpoint=...``) and validate a nightly config; errors name the file and key.

    Relative paths, in the file and in overrides alike, resolve against the config file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: nightly config not found; pass --config PATH (see configs/nightly.yaml)")
    raw = read_yaml_file(path)  # bounded like every medseg config: no alias bomb, no endless file
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'schedule' and 'parameters'")
    apply_overrides(raw, overrides, source=f"{path} (--set)")
    try:
        return NightlyConfig.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise describe_validation_error(exc, str(path)) from None


def resolve_checkpoint(params: FlowParameters) -> Path:
    """The checkpoint file of a run: given directly, or the run folder an experiment config names."""
    if params.checkpoint is not None:
        return checkpoint_file(params.checkpoint)
    assert params.config is not None  # FlowParameters guarantees one of the two
    experiment = load_config(params.config)
    run_dir = experiment.output_dir / experiment.name
    if not (run_dir / "best.pt").is_file() and not (run_dir / "latest.pt").is_file():
        raise CheckpointError(
            f"{run_dir}: no checkpoint yet (the run folder of {params.config}); create it with "
            f"`medseg train --config {params.config}`, or set parameters.checkpoint"
        )
    return checkpoint_file(run_dir)
