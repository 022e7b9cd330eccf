"""Shared file helpers: the one atomic writer, its journal, contained output paths, sha256, natural order.

Why one writer: a mask, a report, a checkpoint and a ledger record must all survive a
crash whole or not at all, honour the user's umask (a group share must be able to read
the masks), and leave litter that medseg can recognise as its own. The writer creates a
temporary file named ``.NAME.TOKEN.medseg-tmp.SUFFIXES`` beside the target, and before it
creates it writes a journal entry ``ROOT/.medseg/journal/TOKEN.json`` naming the temporary
file and the process that made it. A killed run leaves both; `remove_own_temporaries`
deletes only temporary files a journal entry names, whose maker is no longer running.
A user's ``.thesis.partial.docx`` is in no journal, so it is never touched.

Why contained paths: case ids come from file names and DICOM tags (SeriesNumber), which
are untrusted; every path built from one is sanitised part by part and checked, after
resolving links, to lie inside its output root.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
import unicodedata
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from medseg.errors import MedsegError

__all__ = [
    "TMP_MARKER",
    "JOURNAL_DIR",
    "OutsideRootError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "contained_path",
    "ensure_inside",
    "journal_root",
    "natural_key",
    "remove_own_temporaries",
    "safe_part",
    "tidy_journal",
    "unique_names",
    "sha256_file",
]

TMP_MARKER = ".medseg-tmp"
JOURNAL_DIR = Path(".medseg") / "journal"
_MAX_PART_BYTES = 200  # leaves room for suffixes and the temporary-file decoration under NAME_MAX (255)
_JOURNAL_ROOT: ContextVar[Path | None] = ContextVar("medseg_journal_root", default=None)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|]")


class OutsideRootError(MedsegError):
    """A path built from a name or metadata would land outside its output root."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed (a large series never sits in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def natural_key(text: str | Path) -> list[str | int]:
    """Sort key that orders ``slice2`` before ``slice10`` (digits compare as numbers)."""
    name = text.name if isinstance(text, Path) else text
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def safe_part(name: str, max_bytes: int = _MAX_PART_BYTES) -> str:
    """One path component made harmless: no separators, control characters, ``.``/``..`` or leading dot.

    Bytes of a file name that were not UTF-8 (surrogate escapes) become ``_`` too, so the
    name can be written into JSON reports and shown in a page. Characters Windows shares
    and shells trip over become ``_``; the part is cut to ``max_bytes`` of UTF-8 (a length
    every filesystem accepts), its end replaced by a digest of the whole so that cut names
    stay distinct. An empty result becomes ``_``.
    """
    text = "".join("_" if 0xD800 <= ord(c) <= 0xDFFF else c for c in str(name))  # undecodable bytes of a name
    text = unicodedata.normalize("NFC", text).replace("/", "_")
    text = _UNSAFE.sub("_", text).strip()
    if text in ("", ".", ".."):
        text = "_" * max(len(text), 1)
    if text.startswith("."):
        text = "_" + text[1:]
    encoded = text.encode("utf-8")
    if len(encoded) > max_bytes:
        digest = hashlib.sha256(encoded).hexdigest()[:8]
        text = encoded[: max_bytes - 9].decode("utf-8", "ignore") + "~" + digest
    return text


def unique_names(
    names: list[str], sanitise: bool = True, blocked: Callable[[int, str], bool] | None = None
) -> list[str]:
    """``names`` made distinct ignoring case: later twins get ``_2``, ``_3`` (never another name's own).

    Case is ignored because output folders live on SMB/NTFS/APFS shares too, where ``1.png``
    and ``1.PNG`` are the same file. ``sanitise`` passes each name through `safe_part` first;
    ``blocked(index, casefolded candidate)`` rejects candidates for other reasons (a name
    another entry claims).
    """
    safe = [safe_part(name) for name in names] if sanitise else list(names)
    taken = {name.casefold() for name in safe}
    seen: set[str] = set()
    out = []
    for index, name in enumerate(safe):
        candidate, n = name, 2
        while candidate.casefold() in seen or (blocked is not None and blocked(index, candidate.casefold())):
            candidate = f"{name}_{n}"
            while candidate.casefold() in taken:
                n += 1
                candidate = f"{name}_{n}"
            n += 1
        seen.add(candidate.casefold())
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def ensure_inside(root: Path, path: Path) -> Path:
    """``path`` itself, after checking that it resolves inside ``root`` (links followed, loops caught).

    Raises OutsideRootError naming both; a link loop is the same error, not a RuntimeError.
    """
    try:
        resolved_root = Path(root).resolve()
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as exc:
        raise OutsideRootError(
            f"{path}: cannot be resolved ({exc}); remove the link loop or choose another output folder"
        ) from None
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise OutsideRootError(
            f"{path}: resolves to {resolved}, outside the output folder {resolved_root}; "
            "a link inside the output folder points elsewhere, remove it or choose another output folder"
        )
    return Path(path)


def contained_path(root: Path, relative: str, suffix: str = "", folder: str = "") -> Path:
    """``root / folder / relative + suffix``, every part of ``relative`` sanitised, checked to resolve inside ``root``.

    ``relative`` may hold ``/`` (a case id mirrors the input tree); each part is passed
    through `safe_part`. ``folder`` is medseg's own, trusted sub-folder (``.medseg/ledger``,
    ``logs``), not sanitised but checked too: a link there that points elsewhere is caught
    by resolving against ``root`` itself.
    """
    if "/" in suffix or "\x00" in suffix:
        raise ValueError(f"suffix {suffix!r} is not a file name ending")
    parts = [safe_part(p) for p in str(relative).split("/") if p not in ("",)]
    if not parts:
        parts = ["_"]
    # the suffix is medseg's own (.nii.gz, .seg.dcm): a long name is cut before it, never through it
    parts[-1] = safe_part(parts[-1], _MAX_PART_BYTES - len(suffix.encode("utf-8"))) + suffix
    base = Path(root) / folder if folder else Path(root)
    return ensure_inside(root, base.joinpath(*parts))


def _journal_entry(root: Path, token: str, tmp: Path) -> Path:
    """Write ``ROOT/.medseg/journal/TOKEN.json`` naming ``tmp``; the folder must lie inside ``root``."""
    folder = root / JOURNAL_DIR
    entry = folder / f"{token}.json"
    payload = json.dumps({"tmp": os.path.relpath(tmp, root), "pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(5):  # another process's tidy_journal may remove the emptied folders meanwhile
        ensure_inside(root, folder)  # before mkdir: a linked .medseg must not get folders made elsewhere
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ensure_inside(root, folder)
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileNotFoundError:
            continue
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
        except BaseException:
            entry.unlink(missing_ok=True)  # a full disk must not leave an empty entry behind
            raise
        return entry
    raise FileNotFoundError(errno.ENOENT, "journal folder keeps disappearing", str(folder))


def tidy_journal(root: Path) -> None:
    """Remove the journal folder (and ``.medseg``) if empty, so a plain report folder stays plain.

    Called once a command's writes under ``root`` are done (never after each write: threads
    writing in parallel would race to recreate what another just removed).
    """
    for folder in (root / JOURNAL_DIR, root / JOURNAL_DIR.parent):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (another writer, the ledger) or already gone


@contextmanager
def journal_root(root: Path) -> Iterator[None]:
    """Journal every `atomic_path` below ``root`` under ``root`` (the writers inside need not know the root)."""
    token = _JOURNAL_ROOT.set(Path(root))
    try:
        yield
    finally:
        _JOURNAL_ROOT.reset(token)


def _default_root(target: Path) -> Path:
    root = _JOURNAL_ROOT.get()
    if root is not None and (target.parent == root or root in target.parents):
        return root
    return target.parent


@contextmanager
def atomic_path(target: Path, root: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target`` that becomes ``target`` only if the block succeeds.

    The temporary file is created empty with mode 0666 less the umask (so the final file
    has the permissions any other file the user creates would have), journalled under
    ``root`` (default: the `journal_root` in effect if the target is below it, else the
    target's folder), and removed with its journal entry whatever
    happens in the block. ``durable`` fsyncs before the rename (checkpoints).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root is not None else _default_root(target)
    token = secrets.token_hex(6)
    suffix = "".join(target.suffixes[-2:])
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    short = stem.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")  # bytes: NAME_MAX counts bytes
    tmp = target.with_name(f".{short}.{token}{TMP_MARKER}{suffix}")
    entry = _journal_entry(root, token, tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        entry.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes, root: Path | None = None) -> Path:
    """Write ``data`` to ``target`` through `atomic_path`."""
    with atomic_path(target, root) as tmp:
        tmp.write_bytes(data)
    return target


def atomic_write_text(target: Path, text: str, root: Path | None = None) -> Path:
    """Write UTF-8 ``text`` to ``target`` through `atomic_path`."""
    return atomic_write_bytes(target, text.encode("utf-8"), root)


def _alive(pid: int, host: str) -> bool:
    """Whether the process that journalled a temporary file may still be writing it."""
    if host != socket.gethostname():
        return True  # another machine on a shared folder: not ours to judge
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def remove_own_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files that medseg's journal under ``root`` says a dead run left.

    Only files named in a journal entry, carrying the medseg marker and lying inside
    ``root`` are removed; entries of live processes are left alone.
    """
    removed: list[Path] = []
    folder = Path(root) / JOURNAL_DIR
    if not folder.is_dir():
        return removed
    resolved_root = Path(root).resolve()
    for entry in sorted(folder.glob("*.json")):
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            record = json.loads(entry.read_text())
            tmp = Path(root) / str(record["tmp"])
            pid, host = int(record["pid"]), str(record["host"])
        except (OSError, ValueError, KeyError, TypeError):
            # Empty or torn: a writer died (or the disk filled) while writing it. It names nothing
            # we could delete; once surely not being written any more, the entry itself goes.
            if _older_than(entry, 3600):
                entry.unlink(missing_ok=True)
            continue
        if _alive(pid, host):
            continue
        # Only the temporary file this entry's token names: .NAME.TOKEN.medseg-tmp[.SUFFIX], beside its target.
        ours = re.fullmatch(rf"\..*\.{re.escape(entry.stem)}{re.escape(TMP_MARKER)}(\.[^/]*)?", tmp.name)
        try:
            inside = resolved_root in tmp.parent.resolve().parents or tmp.parent.resolve() == resolved_root
        except (OSError, RuntimeError):
            inside = False
        if ours and inside and (tmp.is_file() or tmp.is_symlink()):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        entry.unlink(missing_ok=True)
    return removed
