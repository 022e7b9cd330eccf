"""The nightly deployment in production (issue #18): work pool and workers, one run at a time, no zombie
runs, a clean stop of `medseg serve`, and `medseg status`.

Fast tests check what the deployment declares. The slow ones run it for real: `prefect server start`
(one for the module, with quick service loops), `prefect deploy` of the repository's prefect.yaml,
`prefect worker start`, `medseg serve`, kill -9; every process is stopped by its process group.
Prefect reads its settings when first imported, so PREFECT_HOME points at a temporary folder first.
"""

from __future__ import annotations

import atexit
import datetime as dt
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

if "PREFECT_HOME" not in os.environ or "medseg-test-prefect-" not in os.environ["PREFECT_HOME"]:
    _PREFECT_HOME = tempfile.mkdtemp(prefix="medseg-test-prefect-")
    atexit.register(shutil.rmtree, _PREFECT_HOME, True)
    os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)

import medseg_flows  # noqa: E402,F401  (Prefect's telemetry and heartbeat defaults, before Prefect is imported)
import pytest  # noqa: E402
import yaml  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType  # noqa: E402
from prefect.flows import load_flow_from_entrypoint  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.states import Cancelled, Completed, Crashed, Failed  # noqa: E402
from prefect.utilities.importtools import import_object  # noqa: E402
from prefect.utilities.templating import apply_values  # noqa: E402

from medseg.data import phantoms  # noqa: E402
from medseg.cli import main  # noqa: E402
from medseg.training.loop import train  # noqa: E402

from medseg_flows.deployment import ONE_RUN_AT_A_TIME, nightly_build_step, nightly_deployment, nightly_values  # noqa: E402
from medseg_flows.health import CRASH_AUTOMATION, NIGHTLY, SUMMARY_KEY, crash_automation, server_ui_url  # noqa: E402
from medseg_flows.reporting import SUMMARY_KEY as REPORTED_SUMMARY_KEY  # noqa: E402
from medseg_flows.segment_study import segment_study  # noqa: E402
from medseg_flows.settings import DEPLOYMENT_NAME, FlowParameters, load_nightly_config  # noqa: E402

from conftest import tiny_em_config, write_em_pairs  # noqa: E402
from prefect_live import BIN, REPO, free_port, kill_group, server_process, start, stop, wait_until  # noqa: E402

PREFECT = str(BIN / "prefect")
MEDSEG = str(BIN / "medseg")
# Server and client settings that make a test take seconds instead of minutes (defaults: 60, 30, 15, 60, 10, 10 s).
QUICK = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS": "10",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


# ---------------------------------------------------------------------------------------------
# What the deployment declares (fast).


def write_nightly(folder: Path, model: Path | str, heartbeat: int = 30, crashed_after: int = 90, **params) -> Path:
    """configs/nightly.yaml of a test, under folder/configs, its paths relative to it as the repository's are."""
    parameters = {"input_dir": "../images", "output_dir": "../out", "checkpoint": str(model), **params}
    config = folder / "configs" / "nightly.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump(
            {
                "schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"},
                "parameters": parameters,
                "crash_detection": {"heartbeat_seconds": heartbeat, "crashed_after_seconds": crashed_after},
            }
        )
    )
    return config


def test_prefect_yaml_deploys_what_serve_serves(tmp_path):
    """prefect.yaml takes every parameter, the schedule and the heartbeat from the nightly config (through the
    build step's outputs) and declares what `medseg serve` registers: one run at a time, queued, never paused."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (step,) = spec["build"]
    ((step_name, step_inputs),) = step.items()
    assert import_object(step_name) is nightly_build_step and step_inputs["id"] == "nightly"
    assert step_inputs["config"] == "configs/nightly.yaml" and (REPO / step_inputs["config"]).is_file()
    assert spec["pull"] == []  # workers import the installed medseg_flows package
    (deployment,) = spec["deployments"]
    assert f"{segment_study.name}/{deployment['name']}" == NIGHTLY
    assert load_flow_from_entrypoint(deployment["entrypoint"]) is segment_study
    assert set(deployment["parameters"]) == set(FlowParameters.model_fields)

    (tmp_path / "images").mkdir()
    model = tmp_path / "model.pt"
    model.write_bytes(b"")  # existence is what the check asks for
    config = load_nightly_config(write_nightly(tmp_path, model, heartbeat=45, reference_dir="../labels"))
    deployed = apply_values(deployment, {"nightly": nightly_values(config)})
    served = nightly_deployment(config)

    assert {k: v for k, v in deployed["parameters"].items() if v is not None} == served.parameters
    assert deployed["parameters"]["reference_dir"] == str(tmp_path / "labels")  # absolute, from the config's folder
    (schedule,) = deployed["schedules"]
    assert (schedule["cron"], schedule["timezone"], schedule["active"]) == ("0 2 * * *", "Europe/Berlin", True)
    (served_schedule,) = served.schedules
    assert (served_schedule.schedule.cron, served_schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert deployed["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert ONE_RUN_AT_A_TIME.limit == 1 and ONE_RUN_AT_A_TIME.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert served.concurrency_limit == 1
    assert served.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert deployed["paused"] is False and served.paused is False
    assert deployed["work_pool"]["job_variables"]["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}


def test_crash_detection_config_is_checked(tmp_path, capsys):
    config = load_nightly_config(REPO / "configs" / "nightly.yaml")
    assert (config.crash_detection.heartbeat_seconds, config.crash_detection.crashed_after_seconds) == (30, 90)
    bad = tmp_path / "nightly.yaml"
    for crash, message in [
        ("{heartbeat_seconds: 60, crashed_after_seconds: 90}", "must be at least twice heartbeat_seconds (60)"),
        ("{heartbeat_seconds: 10}", "crash_detection.heartbeat_seconds"),
        ("{crashed_after: 90}", "crash_detection.crashed_after: unknown key"),
    ]:
        bad.write_text(f"parameters: {{input_dir: a, output_dir: b, checkpoint: c}}\ncrash_detection: {crash}\n")
        assert main(["serve", "--config", str(bad), "--check"]) == 1
        err = capsys.readouterr().err
        assert f"{bad}: crash_detection" in err and message in err and "Traceback" not in err


def test_crash_automation_watches_medseg_flows_and_the_states_prefect_reports():
    automation = crash_automation(90, [segment_study.name])
    trigger = automation.trigger
    assert trigger.within == dt.timedelta(seconds=90) and trigger.posture == "Proactive" and trigger.threshold == 1
    assert trigger.for_each == {"prefect.resource.id"}  # one clock per flow run
    # The server names a state event prefect.flow-run.<state name>: each final state ends the watch.
    final = {f"prefect.flow-run.{state().name}" for state in (Completed, Failed, Cancelled, Crashed)}
    assert trigger.expect == final | {"prefect.flow-run.heartbeat"} and trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.match_related.root["prefect.resource.name"] == ["segment-study"]  # the flow has no subflow
    (action,) = automation.actions
    assert action.state == StateType.CRASHED and action.force is False  # a run that ended keeps its state
    assert NIGHTLY == f"{segment_study.name}/{DEPLOYMENT_NAME}" and SUMMARY_KEY == REPORTED_SUMMARY_KEY


@contextmanager
def fake_ui_settings(status: int, body: dict | None):
    """A stand-in for a Prefect server's UI_URL/ui-settings (the JSON a real 3.8.8 server answers)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            payload = json.dumps(body).encode()
            self.send_response(status if self.path == "/ui-settings" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{server.server_port}/api"}):
            yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_ui_address_is_shown_only_when_the_server_serves_its_ui():
    on = {"available_uis": ["v1", "v2"], "v1_base_url": "/", "v2_base_url": "/v2", "default_ui": "v2"}
    off = {"available_uis": [], "v1_base_url": None, "v2_base_url": None, "default_ui": "v2"}
    with fake_ui_settings(200, on) as url:
        assert server_ui_url() == url
    with fake_ui_settings(200, off):
        assert server_ui_url() is None  # prefect server start --no-ui
    with fake_ui_settings(404, {"detail": "Not Found"}):
        assert server_ui_url() is None
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert server_ui_url(timeout=2) is None  # nothing listening


def test_serve_and_status_refuse_without_a_server(tmp_path, capsys):
    """No PREFECT_API_URL: never a temporary server that would take the deployment with it; a server that does
    not answer: one sentence each, exit 1."""
    (tmp_path / "images").mkdir()
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    config = write_nightly(tmp_path, model)
    closed = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--config", str(config)]) == 1
        assert "PREFECT_API_URL is not set" in capsys.readouterr().err
        assert main(["status"]) == 1
        err = capsys.readouterr().err
        assert "PREFECT_API_URL is not set" in err and "the next nightly run will not happen" in err
    with temporary_settings({PREFECT_API_URL: closed}):
        assert main(["serve", "--config", str(config)]) == 1
        assert f"the Prefect server at {closed} does not answer" in capsys.readouterr().err
        assert main(["status"]) == 1
        err = capsys.readouterr().err
        assert f"the Prefect server at {closed} does not answer" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# For real (slow): one Prefect server for the module.


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real Prefect server with quick service loops and the process work pool `medseg` (as the README
    creates it): (API URL, environment for its clients)."""
    with server_process(tmp_path_factory.mktemp("prefect-server"), **QUICK) as (api, env):
        subprocess.run(
            [PREFECT, "work-pool", "create", "medseg", "--type", "process"], env=env, check=True, timeout=120,
            capture_output=True,
        )  # fmt: skip
        yield api, env


def deploy(folder: Path, env: dict[str, str]) -> None:
    """`prefect deploy --all` of the repository's prefect.yaml in `folder`, which holds its configs/nightly.yaml."""
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 2D U-Net (membrane=0, cell=255), trained for seconds; it segments volumes slice by slice."""
    root = tmp_path_factory.mktemp("model")
    write_em_pairs(root, slices=5)
    return train(tiny_em_config(root, root / "runs", "em2d", epochs=1, steps_per_epoch=5), progress=False).run_dir


def write_volumes(folder: Path, count: int, shape=(48, 40, 8)) -> list[str]:
    """`count` NIfTI volumes (case ids vol00, vol01, ...); returns the mask names a run writes."""
    for index in range(count):
        volume = phantoms.ct_phantom(shape=shape, seed=index)
        phantoms.write_nifti(volume.image, volume.affine, folder / f"vol{index:02d}.nii.gz")
    return [f"vol{index:02d}.nii.gz" for index in range(count)]


@contextmanager
def api_client(api: str):
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def run_deployment(client, **parameters) -> UUID:
    deployment = client.read_deployment_by_name(NIGHTLY)
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id


def final_state(client, run_id: UUID, timeout: float, processes=()):
    def ended():
        state = client.read_flow_run(run_id).state
        return state if state.is_final() else None

    return wait_until(ended, timeout, f"flow run {run_id} ending", processes)


def headline(client, run_id: UUID) -> str | None:
    """The counts a run's summary artifact gives ("3 written, 0 skipped (up to date), 0 failed")."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[SUMMARY_KEY])
        )
    )
    return found[0].description if found else None


def scheduled_runs(client, deployment_id: UUID) -> list:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        )
    )


def status(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([MEDSEG, "status"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_work_pool_workers_run_each_run_once_and_never_pause_it(live, model, tmp_path):
    """prefect.yaml for real: the pool, `prefect deploy`, two workers. Two runs started at once: each is taken by
    exactly one worker, the second waits for the first (AwaitingConcurrencySlot) and then skips every scan, so each
    scan is computed once. Stopping the workers never pauses the deployment or removes its schedule or its
    scheduled runs; `medseg status` says all is well while a worker polls, and why not once none does."""
    api, env = live
    masks = write_volumes(tmp_path / "images", 3)
    write_nightly(tmp_path, model)
    logs = {name: tmp_path / f"{name}.log" for name in ("worker-a", "worker-b")}
    workers: list[subprocess.Popen] = []
    try:
        deploy(tmp_path, env)
        with api_client(api) as client:
            deployment = client.read_deployment_by_name(NIGHTLY)
            assert deployment.work_pool_name == "medseg" and not deployment.paused
            assert deployment.parameters["input_dir"] == str(tmp_path / "images")
            assert deployment.parameters["checkpoint"] == str(model)
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
            assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
            assert len(client.read_automations_by_name(CRASH_AUTOMATION)) == 1  # the build step made it

            for name, log in logs.items():
                workers.append(start([PREFECT, "worker", "start", "--pool", "medseg", "--name", name], log, env))
            wait_until(
                lambda: len([w for w in client.read_workers_for_work_pool("medseg") if w.status == "ONLINE"]) == 2,
                120, "two workers online", workers,
            )  # fmt: skip
            first, second = run_deployment(client), run_deployment(client)
            states = {run: final_state(client, run, 300, workers) for run in (first, second)}
            assert all(state.is_completed() for state in states.values()), states
            runs = {run: client.read_flow_run(run) for run in (first, second)}
            for run in runs.values():  # exactly one worker started each run (both may have tried)
                taken = f"Flow run '{run.name}' submitted to infrastructure"
                takers = [name for name, log in logs.items() if taken in log.read_text()]
                assert len(takers) == 1, (run.name, takers)
            waited = [run for run in runs if "AwaitingConcurrencySlot" in _state_names(client, run)]
            assert len(waited) == 1, "exactly one run waited for the other"
            (later,) = waited
            (earlier,) = set(runs) - {later}
            assert runs[later].start_time >= runs[earlier].end_time  # never at the same time
            assert headline(client, earlier).startswith(f"{len(masks)} written, 0 skipped")
            assert headline(client, later).startswith(f"0 written, {len(masks)} skipped")
            assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == masks

            healthy = status(env)
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr
            assert "cron '0 2 * * *' (Europe/Berlin)" in healthy.stdout and "paused:     no" in healthy.stdout
            assert "work pool 'medseg'; ready" in healthy.stdout
            assert f"Completed ({runs[later].name}" in healthy.stdout
            assert f"0 written, {len(masks)} skipped" in healthy.stdout

            wait_until(lambda: scheduled_runs(client, deployment.id), 60, "the scheduler creating the nightly runs")
            planned = {run.id for run in scheduled_runs(client, deployment.id)}
            for worker in workers:
                assert stop(worker, signal.SIGTERM) == 0
                after = client.read_deployment_by_name(NIGHTLY)
                assert not after.paused and [s.active for s in after.schedules] == [True]
                assert planned <= {run.id for run in scheduled_runs(client, deployment.id)}
            stopped = wait_until(
                lambda: (done := status(env)).returncode == 1 and done, 60, "medseg status noticing no worker"
            )
            assert "nothing has polled for segment-study/nightly's runs" in stopped.stderr
            assert "`prefect worker start --pool medseg`" in stopped.stderr
            assert "paused:     no" in stopped.stdout and "is paused" not in stopped.stderr
    finally:
        for worker in workers:
            stop(worker)
        with api_client(api) as client:
            client.delete_deployment(client.read_deployment_by_name(NIGHTLY).id)


@pytest.mark.slow
def test_status_names_each_reason_the_next_run_will_not_happen(live, model, tmp_path):
    """Paused, schedule inactive, no schedule, no deployment: exit 1 and one sentence each."""
    api, env = live
    (tmp_path / "images").mkdir()
    write_nightly(tmp_path, model)
    deploy(tmp_path, env)
    with api_client(api) as client:
        deployment = client.read_deployment_by_name(NIGHTLY)
        client.pause_deployment(deployment.id)
        paused = status(env)
        assert paused.returncode == 1 and "segment-study/nightly is paused, so no scheduled run starts" in paused.stderr
        assert "paused:     yes" in paused.stdout
        assert "nothing has ever polled for segment-study/nightly's runs" in paused.stderr  # no worker yet

        deploy(tmp_path, env)
        assert not client.read_deployment_by_name(NIGHTLY).paused  # the fix the sentence gives works

        (schedule,) = client.read_deployment_by_name(NIGHTLY).schedules
        client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        inactive = status(env)
        assert inactive.returncode == 1 and "every schedule of segment-study/nightly is inactive" in inactive.stderr
        fix = inactive.stderr.split("resume with `")[1].split("`")[0]  # the command the sentence gives works
        subprocess.run(fix.split(), env={**env, "PATH": f"{BIN}:{env['PATH']}"}, check=True, timeout=120)
        assert "inactive" not in status(env).stderr
        client.update_deployment_schedule(deployment.id, schedule.id, active=False)

        client.delete_deployment_schedule(deployment.id, schedule.id)
        none = status(env)
        assert none.returncode == 1 and "segment-study/nightly has no schedule" in none.stderr

        client.delete_deployment(deployment.id)
        gone = status(env)
        assert gone.returncode == 1 and f"there is no deployment segment-study/nightly on {api}" in gone.stderr
    for done in (paused, inactive, none, gone):
        assert "Traceback" not in done.stderr and "the next nightly run will not happen" in done.stderr


@pytest.mark.slow
def test_kill_9_of_serve_leaves_a_crashed_run_that_the_next_run_resumes(live, model, tmp_path):
    """kill -9 of `medseg serve` mid-run: the run is Crashed by the automation serve made, within
    crashed_after_seconds of the last heartbeat; a run that completed before keeps Completed; the next run takes
    the dead run's lock and skips every mask it finished."""
    api, env = live
    crashed_after = 60
    masks = write_volumes(tmp_path / "images", 12)
    config = write_nightly(tmp_path, model, heartbeat=30, crashed_after=crashed_after, workers=1)
    serve_log = tmp_path / "serve.log"
    serve = start([MEDSEG, "serve", "--config", str(config)], serve_log, env, cwd=tmp_path)
    try:
        with api_client(api) as client:
            wait_until(lambda: _deployed(client), 120, "medseg serve registering the deployment", [serve])
            (automation,) = client.read_automations_by_name(CRASH_AUTOMATION)
            assert automation.trigger.within == dt.timedelta(seconds=crashed_after)

            write_volumes(tmp_path / "few", 1)
            early = run_deployment(client, output_dir=str(tmp_path / "out-early"), input_dir=str(tmp_path / "few"))
            assert final_state(client, early, 180, [serve]).is_completed()

            doomed = run_deployment(client)
            out = tmp_path / "out"
            wait_until(lambda: list(out.glob("vol*.nii.gz")), 240, "the first mask of the run", [serve])
            kill_group(serve)
            killed_at = time.monotonic()
            serve.wait(timeout=30)
            finished = sorted(p.name for p in out.glob("vol*.nii.gz"))
            assert 1 <= len(finished) < len(masks), "kill -9 came mid-run"
            assert client.read_flow_run(doomed).state.is_running()

            took = {}
            for run in (doomed,):  # segment-study has no subflow (its scans are tasks)
                state = final_state(client, run, crashed_after + 60, [])
                took[run] = time.monotonic() - killed_at
                assert state.type == StateType.CRASHED and "no heartbeat" in state.message, state
            assert max(took.values()) <= crashed_after + 20, f"Crashed {took} s after kill -9"
            assert client.read_flow_run(early).state.is_completed()  # ended long before: left alone
            print(f"kill -9 after {len(finished)} of {len(masks)} masks: Crashed {max(took.values()):.0f} s later")

            serve = start([MEDSEG, "serve", "--config", str(config)], serve_log, env, cwd=tmp_path)
            resumed = run_deployment(client)
            assert final_state(client, resumed, 300, [serve]).is_completed()
            skipped = len(finished)
            assert headline(client, resumed).startswith(f"{len(masks) - skipped} written, {skipped} skipped"), headline(
                client, resumed
            )
            assert sorted(p.name for p in out.glob("vol*.nii.gz")) == masks
            assert not (out / ".medseg" / "lock").exists()
    finally:
        stop(serve)
        with api_client(api) as client:
            client.delete_deployment(client.read_deployment_by_name(NIGHTLY).id)


@pytest.mark.slow
def test_serve_stops_cleanly_and_never_pauses_the_deployment(live, model, tmp_path):
    """SIGTERM (with a run in flight) and SIGINT: exit 143 / 130 with one line, no coroutine warning, no traceback;
    the run in flight ends Cancelled (not Running); the deployment stays unpaused with its schedule. The server
    runs without its UI, so no UI address is printed."""
    api, env = live
    write_volumes(tmp_path / "images", 12)
    config = write_nightly(tmp_path, model, workers=1)
    with api_client(api) as client:
        for number, code, with_run in ((signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)):
            log = tmp_path / f"serve-{number}.log"
            serve = start([MEDSEG, "serve", "--config", str(config)], log, env, cwd=tmp_path)
            try:
                wait_until(lambda: "medseg serve: serving" in log.read_text(), 120, "medseg serve ready", [serve])
                run = None
                if with_run:
                    run = run_deployment(client)
                    wait_until(lambda: client.read_flow_run(run).state.is_running(), 120, "the run starting", [serve])
                serve.send_signal(number)
                assert serve.wait(timeout=60) == code
            finally:
                stop(serve)
            text = log.read_text()
            assert "never awaited" not in text and "RuntimeWarning" not in text and "Traceback" not in text, text
            assert f"medseg serve: stopped{' (SIGTERM)' if number == signal.SIGTERM else ''}" in text
            assert "UI:" not in text
            if run is not None:
                assert final_state(client, run, 60).type == StateType.CANCELLED
            after = client.read_deployment_by_name(NIGHTLY)
            assert not after.paused and [s.active for s in after.schedules] == [True]
        client.delete_deployment(after.id)


def _state_names(client, run: UUID) -> list[str]:
    return [state.name for state in client.read_flow_run_states(run)]


def _deployed(client) -> bool:
    try:
        return client.read_deployment_by_name(NIGHTLY) is not None
    except Exception:
        return False
