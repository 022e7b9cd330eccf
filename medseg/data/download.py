"""Downloading a dataset named in the manifest: from a local mirror or its source URL, every sha256 verified.

``data_manifest.csv`` has one row per file. ``fetch`` brings a dataset's files into
``ROOT/<dataset>/<path>`` from a local mirror or the source URL and verifies every
sha256, so training never runs on a half-downloaded or silently changed file.

A manifest can come from anywhere, so its URLs are untrusted: downloads go over https://
only (certificate checked, redirects to https:// only); the local mirror is read only
through `medseg.data.mirror` (its own regular files, file:// sources inside it, a dataset
folder that does not overlap it). Each file is streamed and cut off as soon as it grows
past its declared ``size`` (an optional column, in bytes) or, without one, past
``MAX_UNDECLARED_BYTES``, so an endless or wrong source cannot fill the disk; the
partial download is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from medseg.data.manifest import (
    ManifestEntry,
    Opener,
    entries_for,
    default_data_root,
    default_manifest_path,
    default_mirror,
)
from medseg.data.mirror import check_dest, local_source, mirror_copy, open_regular
from medseg.errors import ManifestError
from medseg.files import atomic_path, sha256_file, tidy_journal

__all__ = ["MAX_UNDECLARED_BYTES", "FetchReport", "fetch"]

log = logging.getLogger(__name__)


MAX_UNDECLARED_BYTES = 4 * 2**30  # cap per file where the manifest declares no size (a CT volume is < 1 GiB)
_CHUNK = 1 << 20


@dataclass
class FetchReport:
    """What ``fetch`` did with each file (relative paths), and where the dataset now is."""

    dataset: str
    folder: Path
    verified: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # corrupt files overwritten (--force)

    @property
    def total(self) -> int:
        return len(self.verified) + len(self.copied) + len(self.downloaded)

    def summary(self) -> str:
        text = (
            f"{self.dataset}: {self.total} files verified in {self.folder} "
            f"({len(self.copied)} copied, {len(self.downloaded)} downloaded, "
            f"{len(self.verified)} already verified)"
        )
        if self.replaced:
            text += f"; replaced {len(self.replaced)} corrupt files"
        return text


def _safe_target(folder: Path, entry: ManifestEntry) -> Path:
    """The destination of an entry, refusing one that a symlink would carry out of the folder."""
    target = folder / entry.path
    if not target.resolve().is_relative_to(folder.resolve()):
        raise ManifestError(
            f"{target}: resolves outside {folder} (a symlink in the destination?); "
            "remove the link or choose another --dest"
        )
    return target


def _too_big(origin: str, entry: ManifestEntry, limit: int, manifest: Path | None) -> ManifestError:
    """The one-sentence error for a source that sends more than ``limit`` bytes."""
    where = manifest or default_manifest_path()
    if entry.size is not None:
        return ManifestError(
            f"{origin}: sent more than the {limit} bytes that {where} declares for {entry.dataset}/{entry.path}, "
            "so medseg stopped and deleted the partial file; check the source or correct its size column"
        )
    return ManifestError(
        f"{origin}: sent more than {limit} bytes for {entry.dataset}/{entry.path}, which has no size in {where}, "
        "so medseg stopped and deleted the partial file; add the file's size in bytes to a size column"
    )


def _write_verified(
    source: BinaryIO, target: Path, entry: ManifestEntry, origin: str, manifest: Path | None = None
) -> None:
    """Stream ``source`` into ``target`` atomically; a checksum mismatch leaves nothing behind.

    Reading stops at one byte past the declared size (or ``MAX_UNDECLARED_BYTES``): an endless
    or oversized source costs that much disk at most, and the partial file is deleted.
    """
    limit = entry.size if entry.size is not None else MAX_UNDECLARED_BYTES
    headers = getattr(source, "headers", None)
    announced = headers.get("Content-Length", "") if headers is not None else ""
    if announced.isdigit() and int(announced) > limit:
        raise _too_big(origin, entry, limit, manifest)
    try:
        with atomic_path(target, durable=True) as tmp, open(tmp, "wb") as out:  # a mismatch leaves nothing
            digest = hashlib.sha256()
            total = 0
            while chunk := source.read(min(_CHUNK, limit + 1 - total)):
                total += len(chunk)
                if total > limit:
                    raise _too_big(origin, entry, limit, manifest)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            actual = digest.hexdigest()
            if actual != entry.sha256:
                raise ManifestError(
                    f"{origin}: checksum mismatch for {entry.dataset}/{entry.path}: expected sha256 "
                    f"{entry.sha256}, got {actual}; the file was not saved. Check the source "
                    "(a corrupt mirror or a changed upstream file) or fix the manifest"
                )
    finally:
        tidy_journal(target.parent)  # the data folder keeps no empty .medseg/


class _HttpsOnlyRedirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another https:// address (never down to http:// or elsewhere)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise ManifestError(
                f"{req.full_url}: redirects to {newurl}, which is not an https:// address, so medseg did not follow "
                "it; put the file's final https:// address in the manifest, or fetch it with --mirror DIR"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _https_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks https only (urllib's default one also opens file://, ftp:// and data:)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # https_proxy from the environment, as curl and pip use it
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        _HttpsOnlyRedirect(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def _open_https(url: str, timeout: float) -> BinaryIO:
    return _https_opener().open(url, timeout=timeout)


def _download(
    entry: ManifestEntry,
    target: Path,
    mirror: Path | None = None,
    manifest: Path | None = None,
    opener: Opener | None = None,
) -> None:
    """Bring one file from its source_url: https:// through ``opener``, file:// from inside the mirror."""
    if not entry.source_url:
        raise ManifestError(
            f"{entry.dataset}/{entry.path}: not in the mirror and the manifest gives no source_url; "
            "pass a mirror that has it with --mirror DIR"
        )
    local = local_source(entry, mirror, manifest)
    try:
        if local is not None:
            with open_regular(local) as handle:
                _write_verified(handle, target, entry, entry.source_url, manifest)
            return
        with (opener or _open_https)(entry.source_url, 60.0) as response:
            _write_verified(response, target, entry, entry.source_url, manifest)
    except (urllib.error.URLError, OSError) as exc:
        raise ManifestError(
            f"{entry.source_url}: download of {entry.dataset}/{entry.path} failed ({exc}); "
            "check the network, or fetch from a local copy with --mirror DIR"
        ) from exc


class _Progress:
    """A tqdm bar when stderr is a terminal, otherwise a log line every ~10% of the files."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.bar = tqdm(total=total, desc=desc, unit="file", file=sys.stderr) if sys.stderr.isatty() else None
        self.every = max(1, total // 10)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            log.info("%s: %d/%d files", self.desc, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- public operations


def fetch(
    dataset: str,
    dest: Path | None = None,
    mirror: Path | None = None,
    force: bool = False,
    manifest: Path | None = None,
    opener: Opener | None = None,
) -> FetchReport:
    """Bring every file of ``dataset`` into ``dest/<dataset>/`` and verify its sha256.

    Files already there with the right checksum are kept. A file there with another
    checksum is an error unless ``force`` (local edits are never overwritten silently).
    Missing files are copied from ``mirror/<dataset>/<path>`` (argument or
    ``$MEDSEG_DATA_MIRROR``) when the mirror has them, else downloaded from source_url:
    https:// only, or file:// inside the mirror. The mirror is only read, and only its own
    regular files: an entry that links out of it, or is a folder or a FIFO, is refused; and the
    dataset folder must not overlap the mirror (links in ``dest`` are followed, then checked).
    opener: opens an https:// URL (default: urllib with certificate checks and https-only
    redirects); a parameter so a caller can supply its own transport, and tests a local stream.
    """
    entries = entries_for(dataset, manifest)
    dest = Path(dest) if dest is not None else default_data_root()
    mirror = Path(mirror) if mirror is not None else default_mirror()
    if mirror is not None and not mirror.is_dir():
        raise ManifestError(
            f"{mirror}: mirror folder does not exist; pass an existing folder with --mirror DIR "
            "(layout DIR/<dataset>/<path>) or unset MEDSEG_DATA_MIRROR"
        )
    check_dest(dest, dataset, mirror)
    folder = dest / dataset
    report = FetchReport(dataset=dataset, folder=folder)
    progress = _Progress(len(entries), f"fetch {dataset}")
    try:
        for entry in entries:
            target = _safe_target(folder, entry)
            if target.is_file():
                actual = sha256_file(target)
                if actual == entry.sha256:
                    report.verified.append(entry.path)
                    progress.step()
                    continue
                if not force:
                    raise ManifestError(
                        f"{target}: exists but its sha256 is {actual}, the manifest expects "
                        f"{entry.sha256}; it was left as is. Rerun with --force to replace it"
                    )
                report.replaced.append(entry.path)
            copy = mirror_copy(mirror, entry) if mirror is not None else None
            if copy is not None:
                source = mirror / dataset / entry.path
                try:
                    with open_regular(copy) as handle:
                        _write_verified(handle, target, entry, str(source), manifest)
                except OSError as exc:
                    raise ManifestError(
                        f"{source}: copy to {target} failed ({exc}); check that {folder} is writable"
                    ) from exc
                report.copied.append(entry.path)
            else:
                _download(entry, target, mirror, manifest, opener)
                report.downloaded.append(entry.path)
            progress.step()
    finally:
        progress.close()
    log.info("%s", report.summary())
    return report
