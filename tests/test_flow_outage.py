"""segment-study without its Prefect API, and a local Dask cluster that serves no dashboard.

The run's product is on disk; the API only shows it. These tests check that an API that
goes away costs bounded time and one warning line, never a mask or a report: the guard's
logic without a server (fast), and a real temporary server stopped in the middle of a
run and started again (slow). Like tests/test_flow.py, this module points PREFECT_HOME at
a temporary folder and turns telemetry off before Prefect is imported.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="medseg-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.pop("PREFECT_API_URL", None)
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.events.clients import PrefectEventsClient  # noqa: E402
from prefect.server.api.server import SubprocessASGIServer  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import medseg_flows.reporting  # noqa: E402
import medseg_flows.tasks  # noqa: E402
from medseg_flows import api_guard  # noqa: E402
from medseg_flows.api_guard import quiet_outage_noise, unreachable_reason  # noqa: E402
from medseg_flows.reporting import SUMMARY_KEY, Batch, Outcome, publish_reports  # noqa: E402
from medseg_flows.runners import build_task_runner  # noqa: E402
from medseg_flows.segment_study import segment_study  # noqa: E402
from medseg.data import phantoms  # noqa: E402
from medseg.pipeline import CaseRecord, Job  # noqa: E402
from medseg.training.loop import train  # noqa: E402

from conftest import tiny_em_config, write_em_pairs  # noqa: E402

REFUSED = httpx.ConnectError("[Errno 111] Connection refused")


class FakeTime:
    """A clock that only sleeping moves, so a 300 s patience takes no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Lines(logging.Handler):
    """Every record that reaches a logger's own handlers (after its filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


def raising(error: Exception):
    def call():
        raise error

    return call


@pytest.fixture
def guard_lines(monkeypatch):
    """The process's guard on a fake clock (patience 30 s, a try every 5 s), and the lines it logs."""
    fake, guard = FakeTime(), api_guard.GUARD
    monkeypatch.setattr(guard, "_clock", fake.clock)
    monkeypatch.setattr(guard, "_sleep", fake.sleep)
    monkeypatch.setattr(guard, "retry_every", 5.0)
    guard.start_run("/data/out", patience=30)
    lines = Lines()
    logger = logging.getLogger("prefect.medseg.flows")
    logger.addHandler(lines)
    yield guard, fake, lines
    logger.removeHandler(lines)
    guard.start_run("the output folder")


def test_api_call_is_retried_for_a_bounded_time_then_skipped_with_one_warning(guard_lines):
    guard, fake, lines = guard_lines
    attempts = []

    def artifact():
        attempts.append(fake.now)
        raise REFUSED

    assert guard.call("artifact segment-study-metrics", artifact) is None
    assert len(attempts) == 7  # at 0, 5, ..., 30 s: patience 30 s, one try every 5 s
    assert attempts[-1] - attempts[0] == 30
    warnings = lines.at(logging.WARNING)
    assert len(warnings) == 1
    assert "unreachable for 30 s" in warnings[0] and "ConnectError" in warnings[0]
    assert "artifact segment-study-metrics" in warnings[0] and "/data/out" in warnings[0]
    assert not any(r.exc_info for r in lines.records)  # no traceback
    assert len(lines.at(logging.INFO)) == 1  # the outage's first notice

    # Given up: the next artifact is skipped at once, without a try or another line.
    later = []
    assert guard.call("artifact segment-study-summary", lambda: later.append(1)) is None
    assert later == [] and len(lines.records) == 2
    assert guard.skipped == ["artifact segment-study-metrics", "artifact segment-study-summary"]

    # The guard travels with a pickled flow function (Prefect sends it to Dask workers).
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.gave_up and copy.call("artifact", lambda: 1) is None

    # A new run tries the API again.
    guard.start_run("/data/out")
    assert guard.call("artifact segment-study-summary", lambda: "published") == "published"


def test_api_that_comes_back_in_time_costs_no_warning(guard_lines):
    guard, fake, lines = guard_lines
    answers = iter([REFUSED, httpx.ReadTimeout("timed out"), "artifact-id"])

    def artifact():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert guard.call("artifact segment-study-summary", artifact) == "artifact-id"
    assert fake.sleeps == [5, 5]
    assert lines.at(logging.WARNING) == []
    info = lines.at(logging.INFO)
    assert len(info) == 2 and "unreachable" in info[0] and "reachable again after 10 s" in info[1]
    assert not guard.down and not guard.gave_up


def test_only_an_unreachable_api_is_waited_for(guard_lines):
    guard, _, _ = guard_lines
    request = httpx.Request("POST", "http://127.0.0.1:4200/api/artifacts/")

    def status(code: int) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError("answer", request=request, response=httpx.Response(code, request=request))

    assert unreachable_reason(status(503)) == "HTTP 503"
    assert unreachable_reason(REFUSED).startswith("ConnectError")
    assert unreachable_reason(ConnectionResetError(104, "reset")) is not None
    assert unreachable_reason(status(422)) is None  # the server understood and refused: a bug to see
    assert unreachable_reason(ValueError("bad table")) is None
    for error in (status(422), ValueError("bad table")):
        with pytest.raises(type(error)):
            guard.call("artifact", raising(error))
    assert not guard.down


def test_prefect_event_noise_folds_into_one_line(guard_lines):
    """Prefect logs a warning, then an error carrying the whole event, for every event it cannot send."""
    guard, _, lines = guard_lines
    quiet_outage_noise()
    quiet_outage_noise()  # idempotent
    events = logging.getLogger("prefect.events.clients")
    services = logging.getLogger("prefect._internal.concurrency")
    assert events.filters.count(api_guard._FILTER) == 1
    seen = Lines()
    for logger in (events, services):
        logger.addHandler(seen)
    try:
        client = PrefectEventsClient(api_url="http://127.0.0.1:9/api")
        for _ in range(3):
            client._log_connection_error(OSError(111, "Connect call failed"))  # Prefect's own message
            services.error("Service %r failed to process item %r", "EventsWorker", {"event": "prefect.task-run.x"})
        services.error("Service %r failed to process item %r", "APILogWorker", {"log": "x"})  # not an event: kept
    finally:
        for logger in (events, services):
            logger.removeHandler(seen)
    assert [r.getMessage() for r in seen.records] == ["Service 'APILogWorker' failed to process item {'log': 'x'}"]
    assert guard.down
    info = lines.at(logging.INFO)
    assert len(info) == 1 and "event stream ws://127.0.0.1:9/api/events/in" in info[0]
    assert lines.at(logging.WARNING) == []


def test_reports_are_written_before_the_artifacts_and_without_them(guard_lines, monkeypatch, tmp_path):
    """publish-reports with an API that never answers: predictions.json and the review page are on disk
    before the first artifact call, the run's summary is returned, and the artifact costs one warning."""
    guard, _, lines = guard_lines
    images, out = tmp_path / "images", tmp_path / "out"
    em = phantoms.em_phantom(shape=(32, 32, 1), cells=4, seed=0)
    images.mkdir()
    out.mkdir()
    Image.fromarray(em.image[..., 0]).save(images / "a_em.png")
    Image.fromarray(em.label[..., 0]).save(out / "a_em.png")
    record = CaseRecord("a_em", "microscopy", str(images / "a_em.png"), "written", [str(out / "a_em.png")])
    job = Job(out, tmp_path / "model.pt", "0" * 64, {"membrane": 0, "cell": 255}, "gray", False)
    on_disk_at_call = []

    def refused(**kwargs):
        on_disk_at_call.append(sorted(p.name for p in out.iterdir()))
        raise REFUSED

    monkeypatch.setattr(medseg_flows.reporting, "create_markdown_artifact", refused)
    monkeypatch.setattr(medseg_flows.reporting, "get_run_logger", lambda: logging.getLogger("prefect.medseg.flows"))
    summary = publish_reports.fn(images, None, job, Batch([Outcome(record)], cases=["a_em"]))

    assert summary.counts == {"written": 1, "skipped": 0, "failed": 0}
    assert {"predictions.json", "review.html"} <= set(on_disk_at_call[0])
    assert [r["case"] for r in json.loads((out / "predictions.json").read_text())["records"]] == ["a_em"]
    assert len(on_disk_at_call) == 7  # tried for the whole patience
    assert len(lines.at(logging.WARNING)) == 1 and guard.skipped == [f"artifact {SUMMARY_KEY}"]


def _listening_ports() -> set[int]:
    me = psutil.Process()
    return {
        c.laddr.port
        for p in [me, *me.children(recursive=True)]
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }


def _worker_environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_dask_cluster_serves_no_dashboard_and_keeps_default_malloc():
    """dashboard_address=None is honoured: no dashboard, and the scheduler's HTTP port is not :8787. Its
    workers run one torch thread each but without the nanny's MALLOC_TRIM_THRESHOLD_ (2x slower scans)."""
    pytest.importorskip("prefect_dask")
    runner = build_task_runner("dask", workers=1)
    with runner:
        link = runner.client.dashboard_link  # starts the cluster
        assert list(runner.client.run(_worker_environment).values()) == [
            {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
        ]
        ports = _listening_ports()
        assert 8787 not in ports
        assert link.startswith("http://127.0.0.1:") and int(link.split(":")[2].split("/")[0]) in ports
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(link, timeout=10)
        assert answer.value.code == 404  # the port answers health checks only: no dashboard behind the link


# ---------------------------------------------------------------------------------------------
# A real temporary server, stopped in the middle of a run and started again.


@pytest.fixture(scope="module")
def prefect_server():
    """The temporary server of tests/test_flow.py (prefect_test_harness); SubprocessASGIServer() is it."""
    with prefect_test_harness(server_startup_timeout=120):
        yield SubprocessASGIServer()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    write_em_pairs(root, slices=5)
    return train(tiny_em_config(root, root / "runs", "em2d", epochs=1, steps_per_epoch=4), progress=False).run_dir


def write_pngs(root: Path, count: int) -> tuple[Path, Path]:
    """``count`` single-image EM scans (names end in a letter: one scan each) and their reference masks."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    em = phantoms.em_phantom(shape=(48, 48, count), cells=6, seed=1)
    for i in range(count):
        Image.fromarray(em.image[..., i].astype(np.uint8)).save(images / f"scan{i}_em.png")
        Image.fromarray(em.label[..., i].astype(np.uint8)).save(labels / f"scan{i}_em.png")
    return images, labels


@pytest.mark.slow
def test_run_survives_the_api_going_away_mid_run(prefect_server, model, monkeypatch, tmp_path, caplog):
    images, labels = write_pngs(tmp_path, 6)
    out = tmp_path / "out"
    real_segment, lock, events = medseg_flows.tasks.segment_one, threading.Lock(), {}

    def stop_server_then_segment(ref, job, predictor):
        with lock:
            if "stopped" not in events:
                prefect_server.stop()  # the first scan takes the API down with it
                events["stopped"] = time.monotonic()
        return real_segment(ref, job, predictor)

    def restart_when_reports_are_written():
        deadline = time.monotonic() + 300
        while not all((out / name).is_file() for name in ("predictions.json", "metrics.json", "review.html")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        events["reports"] = time.monotonic()
        time.sleep(3)  # the artifacts meet a dead API first
        prefect_server.start(timeout=120)  # same port, same database
        events["restarted"] = time.monotonic()

    monkeypatch.setattr(medseg_flows.tasks, "segment_one", stop_server_then_segment)
    restarter = threading.Thread(target=contextvars.copy_context().run, args=(restart_when_reports_are_written,))
    restarter.start()  # with this test's settings (the harness's database), so the restarted server has the run
    try:
        state = segment_study(
            input_dir=images, output_dir=out, checkpoint=model, reference_dir=labels, return_state=True
        )
    finally:
        restarter.join(timeout=300)
        if not prefect_server.running:
            prefect_server.start(timeout=120)  # the harness's other users need it back
    assert {"stopped", "reports", "restarted"} <= set(events), events
    assert events["stopped"] < events["reports"] < events["restarted"]  # written while the API was away

    assert state.is_completed(), state.message
    manifest = json.loads((out / "predictions.json").read_text())
    assert {r["case"]: r["status"] for r in manifest["records"]} == {f"scan{i}_em": "written" for i in range(6)}
    assert len(json.loads((out / "metrics.json").read_text())["cases"]) == 6
    assert (out / "review.html").is_file()
    with get_client(sync_client=True) as client:  # the server has the run's final state
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed()
    assert "6 written, 0 skipped (up to date), 0 failed" in Artifact.get(SUMMARY_KEY).data  # published late

    records = caplog.records  # what reached Prefect's handlers (its console and API log handlers)
    messages = [r.getMessage() for r in records]
    assert not any(r.exc_info for r in records)  # no traceback
    assert not [m for m in messages if "Unable to connect" in m or "failed to process item" in m]  # Prefect's noise
    assert sum("Prefect API unreachable" in m for m in messages) == 1
    assert sum("Prefect API reachable again" in m for m in messages) == 1
    assert not [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
