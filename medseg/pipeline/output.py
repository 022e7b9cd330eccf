"""Check the output folder before a batch writes it, and hold it while it does.

The output must lie outside the input tree (compared resolved, and by device and inode, so
links and bind mounts are caught), must not be a file, must take a write (a probe through
the atomic writer) and have room for a conservative estimate of the batch. One run at a time
writes a folder (`output_lock`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from medseg.errors import MedsegError, ScanError
from medseg.files import atomic_path, contained_path, remove_own_temporaries, tidy_journal
from medseg.ingest import ScanRef

__all__ = [
    "LOCK_FILE",
    "OUTPUT_ERRNOS",
    "OutputBusy",
    "OutputUnwritable",
    "check_disjoint",
    "check_reads_outside",
    "check_room",
    "file_size",
    "output_lock",
    "prepare_output",
    "probe_output",
]

OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
PROBE_MARGIN_BYTES = 16 * 2**20  # predictions.json, metrics and the review page


class OutputUnwritable(MedsegError):
    """The output folder cannot take more: the batch stops (what was done is kept and reported)."""


class OutputBusy(MedsegError):
    """Another medseg run (CLI or flow) is writing this output folder now."""


LOCK_FILE = ".medseg/lock"


@contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Hold ``OUTPUT/.medseg/lock`` (PID, host, start time) while a batch writes the folder.

    Why: two runs on one folder (a manual `medseg predict` while the nightly flow runs, two
    workers) would compute every scan twice and race on the reports. The lock is created
    with O_EXCL, so exactly one run gets it; a lock whose process is gone (same host, PID
    not running) is stale and taken over; a lock of another host is respected, and the
    message says how to remove it if that run is gone.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputUnwritable(f"--output {output_dir} is an existing file, not a folder; name a folder")
    path = contained_path(output_dir, "lock", folder=".medseg")
    mine = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    )
    try:
        _take_lock(output_dir, path, mine)
    except OSError as exc:  # a read-only or full folder: one sentence, and no empty lock left behind
        raise OutputUnwritable(
            f"output folder {output_dir}: cannot take its lock {path} ({exc.strerror or exc}); check its "
            "permissions and that the disk is mounted read-write and has room"
        ) from None
    try:
        yield path
    finally:
        try:
            if _lock_holder(path) == json.loads(mine):
                path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder turned read-only: the lock stays, and its ended process makes it stale


def _take_lock(output_dir: Path, path: Path, mine: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None or _holder_alive(holder):
                shown = (
                    "an unreadable lock"
                    if holder is None
                    else (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}")
                )
                raise OutputBusy(
                    f"output folder {output_dir} is being written by {shown}; wait for that run to "
                    f"finish, or if it is gone, remove {path}"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process has ended
            continue
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(mine)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    raise OutputBusy(f"output folder {output_dir}: could not take {path} (another run keeps taking it)")


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine sharing the folder: not ours to judge
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of ``path`` (or its nearest existing ancestor) and of every ancestor above it."""
    found = []
    current = Path(os.path.abspath(path))
    for folder in [current, *current.parents]:
        try:
            info = folder.stat()
        except OSError:
            continue  # not created yet
        found.append((info.st_dev, info.st_ino))
    return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = Path(path).stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_disjoint(input_path: Path, output_dir: Path) -> None:
    """Inputs are never written: the output tree and the input tree must not overlap, even through links.

    Paths are compared resolved, and folders by (device, inode) too, so a bind mount or a
    link of either tree onto the other is caught; a link loop is refused with its sentence.
    """
    try:
        inputs = Path(input_path).resolve()
        input_tree = inputs.parent if inputs.is_file() else inputs
        output = Path(output_dir).resolve()
    except (OSError, RuntimeError) as exc:
        raise OutputUnwritable(
            f"--input {input_path} or --output {output_dir} cannot be resolved ({exc}); "
            "remove the link loop or choose other folders"
        ) from None
    same_path = output == input_tree or input_tree in output.parents or output in input_tree.parents
    tree_id, out_id = _identity(input_tree), _identity(output)
    same_inode = (tree_id is not None and tree_id in _identities(output)) or (
        out_id is not None and out_id in _identities(input_tree)
    )
    if same_path or same_inode:
        raise OutputUnwritable(
            f"output folder {output_dir} (resolved {output}) and input {input_path} (resolved {input_tree}) overlap"
            f"{' through a bind mount or hard link' if same_inode and not same_path else ''}; "
            "medseg never writes into the input tree nor reads its own outputs as inputs: "
            "choose an output folder outside the input folder"
        )


def check_reads_outside(ref: ScanRef, output_dir: Path) -> None:
    """A scan whose files lead into the output folder (a link to a mask) would be overwritten: refused."""
    try:
        root = output_dir.resolve()
        out_id = _identity(root)
        for path in ref.paths:
            real = path.resolve()
            if root in real.parents or (out_id is not None and out_id in _identities(real.parent)):
                raise ScanError(
                    path,
                    f"is a link into the output folder {output_dir} ({real})",
                    "medseg never reads its own outputs as inputs nor writes over an input; replace the "
                    "link with the file itself or remove it",
                )
    except (OSError, RuntimeError) as exc:
        raise ScanError(ref.paths, f"cannot be resolved ({exc})", "remove the link loop") from None


class _Discard(Exception):
    """Leaves an `atomic_path` block without committing its file (the write probe)."""


def check_room(output_dir: Path, needed: int, what: str = "this batch", basis: str = "the size of its inputs") -> None:
    """OutputUnwritable naming the free and the needed MB, and ``basis`` of the estimate, if room is short."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OutputUnwritable(
            f"output folder {output_dir}: {free / 2**20:.0f} MB free, but {what} may need up to "
            f"{needed / 2**20:.0f} MB ({basis}); free some space or choose another output folder"
        )


def probe_output(output_dir: Path, name: str = "--output") -> None:
    """The output folder is a folder, or can be made one, and takes a file: checked before any work.

    Why: a command that learns this at its first write has wasted the work before it (a batch's
    first scan, training's first epoch, the demo's training) and ends in a library's traceback.
    ``name`` is how the user named the folder (``--output``, ``the run folder``). The probe is a
    journalled temporary file, removed at once with its journal entry.
    """
    for folder in (output_dir, *output_dir.parents):
        try:
            is_folder = folder.is_dir()
            if not is_folder and not folder.exists():
                continue
        except OSError:
            break  # a link loop or an unreadable parent: mkdir below says what the system says
        if not is_folder:
            where = "" if folder == output_dir else f" ({folder} is)"
            raise OutputUnwritable(
                f"{name} {output_dir} is an existing file{where}, not a folder; name a folder "
                "(it is created if missing)"
            )
        break
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(output_dir / "medseg-probe", root=output_dir) as probe:
                probe.write_bytes(b"medseg write probe\n")
                raise _Discard  # the temporary file and its journal entry go; nothing is renamed
        except _Discard:
            pass
    except OSError as exc:
        raise OutputUnwritable(
            f"{name} {output_dir}: cannot write there ({exc.strerror or exc}); "
            "check its permissions and that the disk is mounted read-write"
        ) from None
    finally:
        tidy_journal(output_dir)


def prepare_output(input_path: Path, output_dir: Path, refs: Sequence[ScanRef] | None = None) -> list[Path]:
    """Check the output before any scan runs, then clear medseg's own litter of a killed run.

    The room needed is the size of ``refs``' files, or, where the caller has not discovered
    the scans yet (the flow discovers in its own task), of every file under ``input_path``:
    a walk of file sizes, not a second discovery that would parse every header again.

    Returns the temporary files removed (only those medseg's journal names, of dead processes).
    """
    check_disjoint(input_path, output_dir)
    probe_output(output_dir)
    inputs = _tree_bytes(input_path) if refs is None else sum(file_size(p) for ref in refs for p in ref.paths)
    needed = PROBE_MARGIN_BYTES + inputs
    check_room(output_dir, needed)
    return remove_own_temporaries(output_dir)


def _tree_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (links not followed): at least what its scans hold."""
    if not root.is_dir():
        return file_size(root)
    return sum(file_size(Path(folder) / name) for folder, _, names in os.walk(root) for name in names)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
