"""Keeping the nightly batch honest: no run left Running after its process died, and a health check for operators.

Crash detection. A flow run whose process is killed (kill -9, the OOM killer, a machine that
goes down) can tell nobody, so Prefect would show it Running forever and its deployment
concurrency slot would stay taken. Every segment-study run
sends a heartbeat event each ``heartbeat_seconds``; the automation built here marks a run
Crashed when no heartbeat and no final state came for ``crashed_after_seconds``. It is the
proactive trigger Prefect documents for "zombie" runs, narrowed to medseg's flows so runs of
other flows on a shared server (whose heartbeats may be rarer) are never touched. Proposing
Crashed is not forced, so a run that already ended keeps its final state.

Health check. :func:`nightly_health` reads what the server knows about segment-study/nightly
(schedules, paused, whether a ``medseg serve`` or a worker is polling for its runs, the next
and the last run) and lists, one sentence each, every reason the next nightly run will not
happen. ``medseg status`` prints it.

Only Prefect is imported here (no torch, no imaging), so ``medseg status`` answers quickly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import DeploymentStatus, FlowRun, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from medseg.errors import MedsegError

__all__ = [
    "CRASH_AUTOMATION",
    "NIGHTLY",
    "NightlyHealth",
    "ServerUnavailable",
    "crash_automation",
    "ensure_crash_automation",
    "nightly_health",
    "require_server",
    "server_ui_url",
]

NIGHTLY = "segment-study/nightly"  # flow name / deployment name (medseg_flows.settings.DEPLOYMENT_NAME)
CRASH_AUTOMATION = "medseg: mark segment-study runs Crashed when their heartbeats stop"
FINAL_STATES = (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)
SUMMARY_KEY = "segment-study-summary"  # the summary artifact (medseg_flows.reporting.SUMMARY_KEY), read by key


class ServerUnavailable(MedsegError):
    """No Prefect server to talk to: PREFECT_API_URL unset, or the server does not answer."""


def require_server(api_url: str | None) -> None:
    """Fail with one sentence unless a Prefect server answers at api_url.

    Never falls back to a temporary in-process server (what Prefect does with no
    PREFECT_API_URL): a deployment registered there would vanish with this process.
    """
    if not api_url:
        raise ServerUnavailable(
            "PREFECT_API_URL is not set, so there is no Prefect server to use; start one "
            "(prefect server start) and set PREFECT_API_URL to its .../api address"
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        reason = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
        raise ServerUnavailable(
            f"the Prefect server at {api_url} does not answer ({reason}); start it (prefect server start) "
            "or point PREFECT_API_URL at a running one"
        )


def server_ui_url(timeout: float = 5.0) -> str | None:
    """The Prefect UI's address when the server at PREFECT_API_URL serves one (``prefect server start
    --no-ui`` does not), else None: a link to a page that does not exist helps nobody."""
    settings = get_current_settings()
    api_url, ui_url = settings.api.url, settings.ui_url
    if not api_url or not ui_url:
        return None
    if api_url.startswith(settings.cloud.api_url):
        return ui_url  # Prefect Cloud always has its UI
    try:  # a self-hosted server lists the UIs it serves (none with --no-ui) at UI_URL/ui-settings
        response = httpx.get(f"{ui_url.rstrip('/')}/ui-settings", timeout=timeout)
        response.raise_for_status()
        available = response.json().get("available_uis")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return ui_url if available else None


def crash_automation(crashed_after_seconds: int, flow_names: Sequence[str]) -> AutomationCore:
    """The automation that marks a run of these flows Crashed after crashed_after_seconds without a heartbeat."""
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            f"Created by medseg. A run of {', '.join(flow_names)} sends a heartbeat while its process lives; "
            f"after {crashed_after_seconds} s with neither a heartbeat nor a final state its process is gone, "
            "so the run is marked Crashed (which frees the deployment's concurrency slot)."
        ),
        enabled=True,
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": list(flow_names)}
            ),
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s.value.title()}" for s in FINAL_STATES)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=crashed_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {crashed_after_seconds} s: the process running this flow run is gone "
                    "(killed, or its machine went down); the next run resumes the output folder"
                ),
            )
        ],
    )


def ensure_crash_automation(client: SyncPrefectClient, crashed_after_seconds: int, flow_names: Sequence[str]) -> str:
    """Create the crash automation, or bring an existing one (by name) up to date; idempotent.

    Returns "created" or "updated". Copies two processes created at the same moment are removed.
    """
    wanted = crash_automation(crashed_after_seconds, flow_names)
    existing = client.read_automations_by_name(CRASH_AUTOMATION)
    if not existing:
        client.create_automation(wanted)
        return "created"
    keep, *copies = existing
    for copy in copies:
        client.delete_automation(copy.id)
    client.update_automation(keep.id, wanted)
    return "updated"


@dataclass
class NightlyHealth:
    """What the server knows about segment-study/nightly, and why its next run would not happen."""

    api_url: str
    deployment: DeploymentResponse | None = None
    schedules: list[str] = field(default_factory=list)
    next_run: FlowRun | None = None
    active_runs: list[FlowRun] = field(default_factory=list)
    last_run: FlowRun | None = None
    last_summary: str | None = None
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report for a person: one fact a line."""
        lines = [f"{NIGHTLY} on {self.api_url}"]
        deployment = self.deployment
        if deployment is None:
            return lines + ["  deployment: none"]
        lines.append(f"  schedule:   {'; '.join(self.schedules) or 'none'}")
        lines.append(f"  paused:     {'yes' if deployment.paused else 'no'}")
        where = f"work pool {deployment.work_pool_name!r}" if deployment.work_pool_name else "medseg serve"
        polled = _when(deployment.last_polled) if deployment.last_polled else "never"
        status = deployment.status.value.lower().replace("_", " ") if deployment.status else "unknown"
        lines.append(f"  runs by:    {where}; {status} (last polled {polled})")
        lines.append(f"  next run:   {_describe(self.next_run) if self.next_run else 'none scheduled'}")
        for run in self.active_runs:
            lines.append(f"  running:    {_describe(run)}")
        if self.last_run is None:
            lines.append("  last run:   none has ended yet")
        else:
            detail = self.last_summary or (self.last_run.state.message if self.last_run.state else None)
            lines.append(f"  last run:   {_describe(self.last_run)}{f': {detail}' if detail else ''}")
        return lines


def nightly_health(client: SyncPrefectClient, api_url: str) -> NightlyHealth:
    """Read segment-study/nightly from the server (which must answer: see require_server) and judge it."""
    health = NightlyHealth(api_url=api_url)
    try:
        deployment = client.read_deployment_by_name(NIGHTLY)
    except ObjectNotFound:
        health.problems.append(
            f"there is no deployment {NIGHTLY} on {api_url}; create it with `medseg serve` "
            "or `prefect deploy --all` (prefect.yaml)"
        )
        return health
    health.deployment = deployment
    health.schedules = [_schedule_text(s.schedule) + ("" if s.active else ", inactive") for s in deployment.schedules]
    runs = FlowRunFilterDeploymentId(any_=[deployment.id])
    scheduled = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=runs, state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=1,
    )
    health.next_run = scheduled[0] if scheduled else None
    health.active_runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=runs,
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])),
        ),
        sort=FlowRunSort.START_TIME_DESC,
    )
    ended = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=runs, state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(FINAL_STATES)))
        ),
        sort=FlowRunSort.END_TIME_DESC,
        limit=1,
    )
    if ended:
        health.last_run = ended[0]
        summaries = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[ended[0].id]), key=ArtifactFilterKey(any_=[SUMMARY_KEY])
            ),
            limit=1,
        )
        health.last_summary = summaries[0].description if summaries else None
    health.problems = _problems(deployment)
    return health


def _problems(deployment: DeploymentResponse) -> list[str]:
    """Each reason the next scheduled run will not start, one sentence each (none: it will)."""
    problems = []
    if deployment.paused:
        problems.append(
            f"{NIGHTLY} is paused, so no scheduled run starts; resume it in the Prefect UI, "
            "or deploy it again (`medseg serve`, or `prefect deploy --all`), which leaves it unpaused"
        )
    if not deployment.schedules:
        problems.append(
            f"{NIGHTLY} has no schedule, so nothing starts it at night; deploy it again with its "
            "schedule (`medseg serve`, or `prefect deploy --all`)"
        )
    elif not any(s.active for s in deployment.schedules):
        resume = " and ".join(f"`prefect deployment schedule resume {NIGHTLY} {s.id}`" for s in deployment.schedules)
        problems.append(f"every schedule of {NIGHTLY} is inactive, so nothing starts it at night; resume with {resume}")
    if deployment.status != DeploymentStatus.READY:
        polled = f"has polled for {NIGHTLY}'s runs since {_when(deployment.last_polled)}"
        if not deployment.last_polled:
            polled = f"has ever polled for {NIGHTLY}'s runs"
        start = (
            f"`prefect worker start --pool {deployment.work_pool_name}`"
            if deployment.work_pool_name
            else "`medseg serve`"
        )
        problems.append(
            f"nothing {polled}, so a run that comes due would wait as Late; "
            f"start {start} on a machine that sees the scans"
        )
    return problems


def _schedule_text(schedule: object) -> str:
    if isinstance(schedule, CronSchedule):
        return f"cron {schedule.cron!r} ({schedule.timezone or 'UTC'})"
    if isinstance(schedule, IntervalSchedule):
        return f"every {schedule.interval}"
    if isinstance(schedule, RRuleSchedule):
        return f"rrule {schedule.rrule!r}"
    return str(schedule)


def _describe(run: FlowRun) -> str:
    state = run.state.name if run.state else "unknown"
    if run.state and run.state.type == StateType.SCHEDULED:
        return f"{_when(run.expected_start_time)} ({state}, {run.name})"
    started = f", started {_when(run.start_time)}" if run.start_time else ""
    took = f", took {_duration(run.end_time - run.start_time)}" if run.start_time and run.end_time else ""
    return f"{state} ({run.name}{started}{took})"


def _when(moment: dt.datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if moment else "unknown"


def _duration(span: dt.timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
