"""The one checker of the hostile corpus (tests/test_hostile_corpus.py): what must hold after any medseg command.

A case builds its world in a sandbox folder (inputs, an output root, files a user keeps beside and
inside it), then one medseg command runs as a user would run it, and `check` asserts every fact of
issue #15's list, whatever the command and whatever the case:

- the exit status;
- one console line (or HTTP answer) holding the case's fragments together: the file and the problem;
- no traceback on the console, in a log record, or escaping ``main()``;
- nothing created, changed or removed outside the output root (the whole sandbox is walked before and
  after, links not followed; paths outside the sandbox a case names are watched too);
- every file that existed before (inputs, a user's files, inside the output root too) byte-identical
  (sha256), unless the case names it as medseg's own to replace;
- no temporary leftovers: no new file carrying medseg's temporary marker, no journal entry left;
- every file and folder the command created honours the umask;
- for bombs, the peak RSS of the command (a fresh process) above that of the same command on a benign
  input stays under the case's budget.

Commands run in-process (``medseg.cli.main``, console captured at the file descriptors) unless a case
needs a process of its own: peak memory and signals.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from medseg.files import JOURNAL_DIR, TMP_MARKER

REPO = Path(__file__).resolve().parents[2]
CLASSES = {
    1: "containment",
    2: "only our own litter",
    3: "the output is checked first",
    4: "one scan's failure is that scan's",
    5: "budgets before bytes",
    6: "geometry is finite and sane",
    7: "configs cannot hurt",
    8: "checkpoints are checked",
    9: "signals",
    10: "servers and downloads",
    11: "umask",
}

# A fresh interpreter that runs the CLI and writes its own peak RSS (VmHWM, KiB) to argv[1] at exit.
# The peak is reset first: a process started by exec inherits its parent's peak (pytest's, with torch
# loaded) in ru_maxrss, and RUSAGE_CHILDREN keeps the largest child's, which would hide anything smaller;
# writing 5 to clear_refs resets this process's own peak to its RSS now (Linux >= 4.0).
_PRELUDE = r"""
import atexit, sys

def _write_peak(path=sys.argv[1]):
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    with open(path, "w") as fh:
        fh.write(str(kib))

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
atexit.register(_write_peak)
from medseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Run:
    """What a case runs and what must come of it."""

    argv: list[str]  # the medseg command line (without "medseg")
    out: Path | None  # the output root: the only place anything may change (None: nowhere)
    code: int  # the exit status
    says: tuple[str, ...] = ()  # fragments one console line (or HTTP answer) must hold together
    never_says: tuple[str, ...] = ()  # text that must appear nowhere on the console (a canary)
    may_change: tuple[Path, ...] = ()  # files that existed before and are medseg's own to replace or remove
    umask: int = 0o022
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset
    patches: Sequence[tuple[Any, str, Any]] = ()  # in-process monkeypatches: a disk that fills, a remount
    http: Sequence[tuple[bytes, int]] = ()  # `medseg view`: request targets and the status each must get
    process: bool = False  # in a fresh process (peak RSS, signals)
    rss_mb: float | None = None  # the most the peak RSS may exceed the baseline command's by
    baseline: list[str] | None = None  # argv of the same command on a benign input (with rss_mb)
    signal: signal.Signals | None = None  # sent once ``ready()`` is true
    ready: Callable[[], bool] | None = None
    watch: tuple[Path, ...] = ()  # paths outside the sandbox that must not appear
    after: Callable[[], None] | None = None  # the case's own facts (masks written, pages that embed nothing)
    call: Callable[[], tuple[int, str]] | None = None  # instead of argv: (exit status, text), e.g. a flow run


@dataclass(frozen=True)
class Case:
    name: str
    klass: int  # the item of issue #15's "What must hold" this case attacks
    command: str  # predict, evaluate, train, view, data, info, config, demo, flow
    build: Callable[[World], Run]
    slow: bool = False
    xfail: str = ""  # a known gap in code another helper owns: strict, so a fix shows up as XPASS

    @property
    def id(self) -> str:
        return f"{self.klass:02d}-{self.command}-{self.name}"


class World:
    """The sandbox of one case, and what cases share (the tiny model) or need (mounts)."""

    def __init__(self, root: Path, scratch: Path, request: pytest.FixtureRequest) -> None:
        self.root = root  # walked before and after: inputs, outputs and a user's neighbouring files
        self.inputs = root / "in"
        self.out = root / "work" / "out"
        self.scratch = scratch  # outside the sandbox: peak files
        self._request = request
        self.mounts: list[Path] = []
        for folder in (self.inputs, self.out.parent, scratch):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def model(self) -> Path:
        """The run folder of the session's tiny EM U-Net (trained on first use)."""
        return self._request.getfixturevalue("tiny_em_run")

    def fixture(self, name: str) -> Any:
        return self._request.getfixturevalue(name)

    def mount(self, folder: Path, size: str = "4m", read_only: bool = False) -> Path:
        """A tmpfs of ``size`` at ``folder`` (a real full or read-only file system); skips without mount(8) rights."""
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"a real full or read-only folder needs root and mount(8): {done.stderr.decode().strip()}")
        self.mounts.append(folder)
        return folder

    def remount(self, folder: Path, read_only: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(folder)], check=True)

    def unmount_all(self) -> None:
        for folder in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(folder)], check=False)
        self.mounts.clear()


# ------------------------------------------------------------------------------------------ the tree


def tree_state(root: Path) -> dict[Path, tuple]:
    """Every entry below ``root`` (links not followed): files by sha256 and mode, links by target, folders by mode."""
    state: dict[Path, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                state[path] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                state[path] = ("dir", stat.S_IMODE(info.st_mode))
            elif stat.S_ISREG(info.st_mode):
                state[path] = ("file", _sha256(path), stat.S_IMODE(info.st_mode))
            else:
                state[path] = ("special", stat.S_IFMT(info.st_mode))
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _under(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


# ------------------------------------------------------------------------------------------ runners


@dataclass
class Outcome:
    code: int | None
    console: str
    peak_mb: float | None = None


def run_in_process(run: Run, world: World, monkeypatch: pytest.MonkeyPatch, capfd, caplog) -> Outcome:
    """``medseg.cli.main(run.argv)`` here, console captured at the file descriptors, logs by caplog."""
    from medseg.cli import main
    from medseg.review import ReviewServer

    for target, name, value in run.patches:
        monkeypatch.setattr(target, name, value)
    for key, value in run.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(world.root)  # a relative path medseg writes lands in the walked sandbox
    answers: list[str] = []
    # `medseg view` serves until Ctrl+C: here it answers the case's requests, then gets its Ctrl+C
    monkeypatch.setattr(ReviewServer, "wait", lambda server, timeout=None: _ask(server, run.http, answers))
    crash = ""
    old = os.umask(run.umask)
    try:
        if run.call is not None:
            code, text = run.call()
            answers.append(text)
        else:
            code = main(run.argv)
    except SystemExit as exc:  # argparse refusing an argument
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - anything escaping main() is what the checker reports
        code, crash = None, traceback.format_exc()
    finally:
        os.umask(old)
    captured = capfd.readouterr()
    logged = [r for r in caplog.records if r.exc_info]
    text = "\n".join([captured.out, captured.err, caplog.text, *answers, crash])
    if logged:
        text += "\nTraceback (a log record carried exc_info): " + logged[0].getMessage()
    return Outcome(code, text)


def _ask(server: Any, targets: Sequence[tuple[bytes, int]], answers: list[str]) -> None:
    """Stands in for the wait of `medseg view`: sends each target raw, records the answers, then Ctrl+C."""
    port = server.httpd.server_address[1]
    for target, expected in targets:
        request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None
        body = data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace").replace("\n", " ")
        answers.append(f"HTTP {status} (expected {expected}) for {target[:80]!r}: {body}")
    raise KeyboardInterrupt  # how a user stops `medseg view`


_BASELINES: dict[tuple[str, ...], float] = {}


def run_process(run: Run, world: World) -> Outcome:
    """The CLI in a fresh process: its console, exit status and own peak RSS."""
    peak_file = world.scratch / f"peak-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    for key, value in run.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.Popen(
        [sys.executable, "-c", _PRELUDE, str(peak_file), *run.argv],
        cwd=world.root,
        env=env,
        umask=run.umask,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        if run.signal is not None:
            assert run.ready is not None, "a signal case says when to send it"
            deadline = time.monotonic() + 90
            while not run.ready():
                if proc.poll() is not None:
                    break  # ended before the signal: the exit status check reports it
                assert time.monotonic() < deadline, "timed out waiting for the command to get going"
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(run.signal)
        out, err = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    peak = int(peak_file.read_text()) / 1024 if peak_file.is_file() else None
    return Outcome(proc.returncode, out + "\n" + err, peak)


def baseline_mb(run: Run, world: World) -> float:
    """The peak RSS of the baseline command (cached: cases with the same baseline run it once)."""
    key = tuple(run.baseline or ())
    if key not in _BASELINES:
        done = run_process(Run(list(key), None, 0, process=True, env=run.env), world)
        assert done.code == 0 and done.peak_mb is not None, done.console[-2000:]
        _BASELINES[key] = done.peak_mb
    return _BASELINES[key]


# ------------------------------------------------------------------------------------------ the checker


def check(case: Case, world: World, monkeypatch: pytest.MonkeyPatch, capfd, caplog) -> Outcome:
    """Build the case, run it, and assert the whole list of issue #15 (see the module docstring)."""
    run = case.build(world)
    before = tree_state(world.root)
    watched = {p: p.exists() for p in run.watch}
    try:
        if run.process:
            outcome = run_process(run, world)
        else:
            outcome = run_in_process(run, world, monkeypatch, capfd, caplog)
        after = tree_state(world.root)
        if run.after is not None:
            run.after()
    finally:
        monkeypatch.undo()
        world.unmount_all()
    console = outcome.console
    tail = console[-3000:]

    assert "Traceback" not in console, f"a traceback reached the user:\n{tail}"
    assert outcome.code == run.code, f"exit status {outcome.code}, expected {run.code}:\n{tail}"
    if run.says:
        lines = console.splitlines()
        assert any(all(part in line for part in run.says) for line in lines), f"no line says {run.says}:\n{tail}"
    leaked = [text for text in run.never_says if text in console]
    assert not leaked, f"the console shows {leaked}:\n{tail}"
    for target, expected in run.http:
        assert f"HTTP {expected} (expected {expected}) for {target[:80]!r}" in console, tail

    changed = {p for p in after if before.get(p) != after[p]} | {p for p in before if p not in after}
    outside = sorted(str(p) for p in changed if not _under(p, run.out) and p not in run.may_change)
    assert not outside, f"changed outside the output root {run.out}: {outside[:10]}"
    touched = sorted(
        str(p) for p, state in before.items() if state[0] != "dir" and after.get(p) != state and p not in run.may_change
    )
    assert not touched, f"files that existed before were changed or removed: {touched[:10]}"
    assert [p for p, there in watched.items() if p.exists() and not there] == [], "a watched path appeared"

    new = {p: s for p, s in after.items() if p not in before}
    litter = sorted(str(p) for p in new if TMP_MARKER in p.name or _is_journal_entry(p, new[p]))
    assert not litter, f"temporary leftovers: {litter[:10]}"
    file_mode, dir_mode = 0o666 & ~run.umask, 0o777 & ~run.umask
    wrong = sorted(
        f"{p} {oct(s[-1])}"
        for p, s in new.items()
        if (s[0] == "file" and s[-1] != file_mode) or (s[0] == "dir" and s[-1] != dir_mode)
    )
    assert not wrong, f"not honouring umask {oct(run.umask)}: {wrong[:10]}"

    if run.rss_mb is not None:
        assert outcome.peak_mb is not None, "the peak RSS was not measured"
        growth = outcome.peak_mb - baseline_mb(run, world)
        print(f"{case.id}: peak RSS {outcome.peak_mb:.0f} MB, {growth:+.1f} MB over the baseline {run.baseline}")
        assert growth < run.rss_mb, f"peak RSS grew {growth:.0f} MB, more than {run.rss_mb} MB"
    return outcome


def _is_journal_entry(path: Path, state: tuple) -> bool:
    return state[0] == "file" and path.parent.name == JOURNAL_DIR.name and path.parent.parent.name == ".medseg"
