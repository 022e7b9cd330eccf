"""Real Prefect processes for the deployment tests: a server, `medseg serve`, workers.

Each process starts in its own process group with its output in a log file, and is stopped
by its group (a served or worker-run flow runs in a child process), so a test never leaves
anything running. A real server is CPU-heavy on a small machine: tests start one at a time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    check: Callable[[], object], timeout: float, what: str, processes: Iterable[subprocess.Popen] = ()
) -> object:
    """Poll check() until it returns something true (returned); fail naming `what` on timeout or a dead process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"{what}: {process.args[:3]} exited with {process.returncode}")
        if result := check():
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(args: list[str], log: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start a process in a new process group, stdout and stderr into `log`."""
    with open(log, "ab") as handle:
        return subprocess.Popen(
            args, cwd=cwd, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process, wait for it (SIGKILL to its group after `timeout`), then kill what is left of its group."""
    if process.poll() is None:
        try:
            process.send_signal(sig)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(process)
    return process.wait(timeout=30)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process left in the process's group (children it started included)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def prefect_env(api: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Prefect process of a test: its own PREFECT_HOME, this tree's medseg first on the
    path (medseg_flows, the flows/ folder under its installed name, comes from the installed medseg)."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **extra,
    }


@contextmanager
def server_process(root: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start --no-ui` on a free loopback port; yields (API URL, environment for its clients).

    `settings` are extra environment variables for the server and its clients (e.g. faster service loops).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api, root / "prefect-home", **settings)
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
        + ["--analytics-off"],
        root / "server.log",
        env,
    )
    try:
        wait_until(lambda: healthy(api), 120, "prefect server start", [server])
        yield api, env
    finally:
        stop(server)
