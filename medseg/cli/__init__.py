"""The `medseg` command: one sub-command per module in medseg.cli."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from medseg import __version__
from medseg.errors import MedsegError

# Each module exposes register(subparsers); its parser sets `func` to the handler.
COMMAND_MODULES = (
    "medseg.cli.info",
    "medseg.cli.data",
    "medseg.cli.config",
    "medseg.cli.plan",
    "medseg.cli.train",
    "medseg.cli.predict",
    "medseg.cli.evaluate",
    "medseg.cli.demo",
    "medseg.cli.serve",
    "medseg.cli.status",
    "medseg.cli.view",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Batch segmentation of medical and microscopy images.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Library INFO lines say nothing a user acts on (highdicom alone logs ~10 per DICOM SEG); -v shows them.
    for name in ("highdicom", "httpx", "distributed"):
        logging.getLogger(name).setLevel(logging.NOTSET if args.verbose else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    started = time.time()
    with _sigterm_raises() as terminated:
        try:
            code = int(args.func(args) or 0)
        except MedsegError as exc:
            print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a disk that fills, a folder that turns read-only: the system's words, one line
            logging.getLogger("medseg").debug("%s failed", args.command, exc_info=True)  # -v: the traceback
            print(f"medseg {args.command}: error: {_system_error(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:  # Ctrl+C, or SIGTERM as Terminated: one line, no traceback
            return _stopped(args, bool(terminated) or isinstance(exc, Terminated), started)
    if terminated:  # the command caught the interrupt itself (e.g. `view` stops its server) and returned
        return _stopped(args, True, started)
    return code


def _system_error(exc: OSError) -> str:
    """An OSError as one sentence naming its file(s), the system's reason and what to check."""
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc} (-v shows the traceback)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl+C raises KeyboardInterrupt, so a terminated run
    (a scheduler's stop, `kill`) unwinds the same way: finally blocks run, temporary files of atomic
    writes are removed, and main() exits 143 with a resume hint instead of dying mid-write."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[list[int]]:
    """While inside, SIGTERM raises :class:`Terminated`; the list it yields records each SIGTERM.

    Only the main thread may set handlers (main() can run in a worker thread, e.g. under
    Prefect); a SIGTERM the parent process ignores stays ignored; the old handler comes back
    on exit, so tests that call main() in-process leave the test runner as it was."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield received
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _stopped(args: argparse.Namespace, terminated: bool, started: float) -> int:
    """Print one line on what an interrupted command leaves and how to go on; 130 (SIGINT) or 143 (SIGTERM)."""
    try:
        hint = _resume_hint(args, started)
    except (KeyboardInterrupt, MedsegError, OSError):  # a second signal, or a config that cannot be read now
        hint = "interrupted; rerun the same command to go on"
    print(f"medseg {args.command}: {hint}{' (SIGTERM)' if terminated else ''}", file=sys.stderr)
    return 128 + int(signal.SIGTERM if terminated else signal.SIGINT)


def _resume_hint(args: argparse.Namespace, started: float) -> str:
    """What the interrupted command keeps: predict and data fetch skip finished files on the next
    run; train resumes from the latest.pt its last finished epoch wrote."""
    if args.command == "predict":
        return f"interrupted; rerun the same command to resume: finished masks are kept in {args.output}"
    if args.command == "data" and getattr(args, "action", None) == "fetch":
        return "interrupted; rerun the same command to resume: files already verified are kept"
    if args.command == "train" and getattr(args, "fold", None) is not None:
        run_dir = args.resume or _train_run_dir(args)
        return (
            f"interrupted; go on with --fold {args.fold} --resume {run_dir} (finished folds are kept, "
            "the interrupted one resumes from its last finished epoch)"
        )
    if args.command == "train":
        run_dir = args.resume or _train_run_dir(args)
        if run_dir is None:
            return "interrupted while planning, before training began; rerun the same command to start again"
        latest = run_dir / "latest.pt"
        if latest.is_file() and (args.resume or latest.stat().st_mtime >= started):
            return f"interrupted; resume with --resume {run_dir} (from its last finished epoch)"
        return f"interrupted before the first epoch was saved in {run_dir}; rerun the same command to start again"
    if args.command in ("serve", "view"):
        return "stopped"
    return "interrupted; rerun the same command to start again"


def _train_run_dir(args: argparse.Namespace) -> Path | None:
    """The run folder: as the command found it (it sets ``run_dir`` once known), else from the config;
    None while `train --images` is still planning."""
    from medseg.config import load_config

    if getattr(args, "run_dir", None) is not None:
        return args.run_dir
    if args.config is None:
        return None
    config = load_config(args.config, args.overrides)
    return config.output_dir / config.name


if __name__ == "__main__":
    sys.exit(main())
