"""The data manifest: which files make up each dataset, their checksums, and how to fetch them.

``data_manifest.csv`` has one row per file. ``fetch`` brings a dataset's files into
``ROOT/<dataset>/<path>`` from a local mirror or the source URL and verifies every
sha256, so training never runs on a half-downloaded or silently changed file.

A manifest can come from anywhere, so its URLs are untrusted: downloads go over https://
only (certificate checked, redirects to https:// only); a file:// URL is read only from
inside the local mirror. Each file is streamed and cut off as soon as it grows past its
declared ``size`` (an optional column, in bytes) or, without one, past
``MAX_UNDECLARED_BYTES``, so an endless or wrong source cannot fill the disk; the
partial download is deleted.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

from tqdm import tqdm

import medseg
from medseg.errors import ManifestError
from medseg.files import atomic_path, natural_key, sha256_file, tidy_journal

__all__ = [
    "COLUMNS",
    "MAX_UNDECLARED_BYTES",
    "OPTIONAL_COLUMNS",
    "CaseFiles",
    "DatasetStatus",
    "FetchReport",
    "ManifestEntry",
    "dataset_files",
    "dataset_status",
    "default_data_root",
    "default_manifest_path",
    "default_mirror",
    "fetch",
    "read_manifest",
    "sha256_file",
]

log = logging.getLogger(__name__)

COLUMNS = ("dataset", "case", "role", "path", "sha256", "split", "source_url", "licence")
# size: bytes, a download is cut off as soon as it grows past it; fold: a fixed cross-validation
# fold (0, 1, ...) that `data.split.mode: kfold` uses instead of drawing one, so runs compare.
OPTIONAL_COLUMNS = ("size", "fold")
MAX_UNDECLARED_BYTES = 4 * 2**30  # cap per file where the manifest declares no size (a CT volume is < 1 GiB)
ROLES = ("image", "label")
SPLITS = ("train", "val", "test")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # dataset ids become folder names
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_SIZE = re.compile(r"[0-9]{1,15}")

Opener = Callable[[str, float], BinaryIO]  # (https URL, timeout in seconds) -> a readable response


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a dataset, as listed in one row of the manifest."""

    dataset: str
    case: str
    role: str
    path: str  # relative to the dataset folder, '/'-separated
    sha256: str
    split: str
    source_url: str
    licence: str
    line: int = field(default=0, compare=False)  # line in the manifest, for error messages
    size: int | None = None  # bytes, where the manifest declares it (the optional size column)
    fold: int | None = None  # the fixed cross-validation fold, where the manifest declares one

    def local_path(self, root: Path) -> Path:
        """Where this file lives under a data root: ``root/<dataset>/<path>``."""
        return Path(root) / self.dataset / self.path


class CaseFiles(NamedTuple):
    """Verified local files of one case; ``label`` is None for unlabelled cases."""

    case: str
    image: Path
    label: Path | None


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


@dataclass
class DatasetStatus:
    """How much of one dataset is present and intact under a data root."""

    dataset: str
    folder: Path
    expected: int
    present: int
    verified: int
    missing: list[str]
    corrupt: list[str]

    @property
    def status(self) -> str:
        if self.corrupt:
            return "corrupt"
        if self.verified == self.expected:
            return "verified"
        return "missing" if self.present == 0 else "incomplete"


# --------------------------------------------------------------------------- locations


def default_manifest_path() -> Path:
    """The manifest at the root of the source tree (source checkouts and editable installs)."""
    return Path(medseg.__file__).resolve().parents[1] / "data_manifest.csv"


def default_data_root() -> Path:
    """``$MEDSEG_DATA_DIR``, else ``$XDG_CACHE_HOME/medseg/data``, else ``~/.cache/medseg/data``."""
    if os.environ.get("MEDSEG_DATA_DIR"):
        return Path(os.environ["MEDSEG_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "medseg" / "data"


def default_mirror() -> Path | None:
    """The mirror folder named by ``$MEDSEG_DATA_MIRROR``, if set."""
    value = os.environ.get("MEDSEG_DATA_MIRROR")
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------- reading


def _path_problem(path: str) -> str | None:
    """Why a manifest path could escape (or not name a file in) the dataset folder, if it could."""
    if not path:
        return "is empty"
    if "\\" in path:
        return "contains a backslash; use '/' separators"
    if _DRIVE.match(path):
        return "starts with a drive letter; use a path relative to the dataset folder"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "is absolute; use a path relative to the dataset folder"
    if ".." in pure.parts:
        return "has a '..' component that leaves the dataset folder"
    if path.endswith("/") or pure.name in ("", "."):
        return "does not name a file"
    return None


def _row_problems(row: dict[str, str]) -> list[str]:
    problems = []
    for name in ("dataset", "case", "role", "path", "sha256"):
        if not row[name]:
            problems.append(f"column '{name}' is empty")
    if row["dataset"] and not _NAME.fullmatch(row["dataset"]):
        problems.append(f"dataset id {row['dataset']!r} must be letters, digits, '_', '.', '-'")
    if row["role"] and row["role"] not in ROLES:
        problems.append(f"role {row['role']!r} must be one of {', '.join(ROLES)}")
    if row["split"] not in SPLITS + ("",):
        problems.append(f"split {row['split']!r} must be one of {', '.join(SPLITS)} or empty")
    if row["sha256"] and not _SHA256.fullmatch(row["sha256"]):
        problems.append(f"sha256 {row['sha256']!r} is not 64 hex characters")
    if row["path"] and (why := _path_problem(row["path"])):
        problems.append(f"path {row['path']!r} {why}")
    if row.get("size") and not _SIZE.fullmatch(row["size"]):
        problems.append(f"size {row['size']!r} must be the file's size in bytes (digits only) or empty")
    if row.get("fold") and not re.fullmatch(r"[0-9]{1,2}", row["fold"]):
        problems.append(f"fold {row['fold']!r} must be a fold number 0-99 or empty")
    return problems


def read_manifest(path: Path | None = None) -> list[ManifestEntry]:
    """Read and validate a manifest; every problem found is reported in one ManifestError."""
    path = Path(path) if path is not None else default_manifest_path()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; pass an existing data_manifest.csv with --manifest CSV")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(
                    f"{path}: missing column(s) {', '.join(missing)}; the header line must be: {','.join(COLUMNS)}"
                )
            wanted = COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in (reader.fieldnames or []))
            rows = [({k: (row[k] or "").strip() for k in wanted}, reader.line_num) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot be read as UTF-8 CSV ({exc}); fix the file") from exc

    problems: list[str] = []
    entries: list[ManifestEntry] = []
    for row, line in rows:
        row_problems = _row_problems(row)
        problems += [f"{path}: line {line}: {p}" for p in row_problems]
        if not row_problems:
            size_text, fold_text = row.pop("size", ""), row.pop("fold", "")
            size = int(size_text) if size_text else None
            fold = int(fold_text) if fold_text else None
            entries.append(ManifestEntry(**{**row, "sha256": row["sha256"].lower()}, line=line, size=size, fold=fold))
    problems += _consistency_problems(entries, path)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ManifestError(f"invalid manifest {path}:\n  {shown}{more}")
    return entries


def _consistency_problems(entries: list[ManifestEntry], path: Path) -> list[str]:
    """Cross-row checks: unique files, one image (and at most one label) per case."""
    problems = []
    seen_paths: dict[tuple[str, str], int] = {}
    seen_roles: dict[tuple[str, str, str], ManifestEntry] = {}
    for e in entries:
        key = (e.dataset, e.path)
        if key in seen_paths:
            problems.append(
                f"{path}: line {e.line}: {e.dataset} path {e.path!r} is already listed "
                f"on line {seen_paths[key]}; list each file once"
            )
        seen_paths.setdefault(key, e.line)
        role_key = (e.dataset, e.case, e.role)
        if role_key in seen_roles:
            problems.append(
                f"{path}: line {e.line}: case {e.case!r} of {e.dataset} has a second {e.role} "
                f"(first on line {seen_roles[role_key].line}); give each case one image and at most one label"
            )
        seen_roles.setdefault(role_key, e)
    for (dataset, case, role), e in seen_roles.items():
        if role != "label":
            continue
        image = seen_roles.get((dataset, case, "image"))
        if image is None:
            problems.append(
                f"{path}: line {e.line}: label {e.path!r} has no image with case {case!r} in {dataset}; "
                "add the image row or fix the case id"
            )
        elif image.split != e.split:
            problems.append(
                f"{path}: line {e.line}: label of case {case!r} has split {e.split!r} "
                f"but its image (line {image.line}) has split {image.split!r}"
            )
    return problems


def _entries_for(dataset: str, manifest: Path | None) -> list[ManifestEntry]:
    entries = read_manifest(manifest)
    chosen = [e for e in entries if e.dataset == dataset]
    if not chosen:
        known = ", ".join(sorted({e.dataset for e in entries})) or "none"
        where = manifest or default_manifest_path()
        raise ManifestError(f"unknown dataset {dataset!r} in {where}; known datasets: {known}")
    return chosen


# --------------------------------------------------------------------------- checksums and copying


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


def _local_source(entry: ManifestEntry, mirror: Path | None, manifest: Path | None) -> Path | None:
    """The mirror file a file:// source_url names; None for an https:// URL; ManifestError for anything else.

    Why: a manifest URL is untrusted. Plain http:// can be altered on the way (the sha256 would
    catch it, after the whole download), ftp://, gopher:// and data: have no place here, and a
    file:// URL could name any file or device (``/dev/zero`` never ends) unless it is confined
    to the mirror folder the user chose.
    """
    url = entry.source_url
    where = manifest or default_manifest_path()
    name = f"{entry.dataset}/{entry.path}"
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return None
    if scheme != "file":
        shown = (
            "an https:// URL with no host"
            if scheme == "https"
            else f"a {scheme}: URL"
            if scheme
            else "not a URL (it has no scheme)"
        )
        raise ManifestError(
            f"{url}: is {shown}, and medseg downloads {name} only over https://; change its source_url in {where} "
            "to an https:// address, or pass --mirror DIR holding the file"
        )
    if mirror is None:
        raise ManifestError(
            f"{url}: file:// sources are read only from a local mirror, and none was given for {name}; pass "
            "--mirror DIR (or set MEDSEG_DATA_MIRROR) naming the folder that holds it, or use an https:// URL"
        )
    try:
        path = Path(urllib.request.url2pathname(parts.path)).resolve()
        inside = parts.netloc in ("", "localhost") and path.is_relative_to(mirror.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise ManifestError(
            f"{url}: lies outside the mirror {mirror} (after links), so {name} was not read from it; point the "
            "source_url into the mirror folder, or pass --mirror DIR naming the folder that holds it"
        )
    if not path.is_file():
        raise ManifestError(
            f"{url}: is not a regular file in the mirror {mirror}, so {name} was not read; put the file there "
            "or fix its source_url"
        )
    return path


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
    local = _local_source(entry, mirror, manifest)
    try:
        if local is not None:
            with local.open("rb") as handle:
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
    https:// only, or file:// inside the mirror. The mirror is only read.
    opener: opens an https:// URL (default: urllib with certificate checks and https-only
    redirects); a parameter so a caller can supply its own transport, and tests a local stream.
    """
    entries = _entries_for(dataset, manifest)
    dest = Path(dest) if dest is not None else default_data_root()
    mirror = Path(mirror) if mirror is not None else default_mirror()
    if mirror is not None and not mirror.is_dir():
        raise ManifestError(
            f"{mirror}: mirror folder does not exist; pass an existing folder with --mirror DIR "
            "(layout DIR/<dataset>/<path>) or unset MEDSEG_DATA_MIRROR"
        )
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
            source = mirror / dataset / entry.path if mirror is not None else None
            if source is not None and source.is_file():
                try:
                    with source.open("rb") as handle:
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


def dataset_status(dest: Path | None = None, manifest: Path | None = None) -> list[DatasetStatus]:
    """Per dataset in the manifest: files expected, present, verified, missing and corrupt."""
    dest = Path(dest) if dest is not None else default_data_root()
    by_dataset: dict[str, list[ManifestEntry]] = {}
    for entry in read_manifest(manifest):
        by_dataset.setdefault(entry.dataset, []).append(entry)
    statuses = []
    for dataset, entries in sorted(by_dataset.items()):
        folder = dest / dataset
        missing, corrupt = [], []
        for entry in entries:
            target = entry.local_path(dest)
            if not target.is_file():
                missing.append(entry.path)
            elif sha256_file(target) != entry.sha256:
                corrupt.append(entry.path)
        present = len(entries) - len(missing)
        statuses.append(DatasetStatus(dataset, folder, len(entries), present, present - len(corrupt), missing, corrupt))
    return statuses


def dataset_files(
    dataset: str,
    root: Path | None = None,
    split: str | Iterable[str] | None = None,
    manifest: Path | None = None,
    verify: bool = True,
) -> list[CaseFiles]:
    """Local (case, image, label-or-None) files of a dataset, optionally one split, in case order.

    Raises ManifestError saying how to fetch the dataset if any file is missing, and
    (with ``verify``) if any checksum differs, so training never reads a bad copy.
    """
    root = Path(root) if root is not None else default_data_root()
    splits = {split} if isinstance(split, str) else set(split) if split is not None else None
    if splits is not None and not splits <= set(SPLITS):
        raise ManifestError(f"unknown split(s) {sorted(splits - set(SPLITS))}; use {', '.join(SPLITS)}")
    entries = [e for e in _entries_for(dataset, manifest) if splits is None or e.split in splits]
    missing = [e for e in entries if not e.local_path(root).is_file()]
    if missing:
        raise ManifestError(
            f"{len(missing)} of {len(entries)} files of {dataset} are missing under {root / dataset} "
            f"(first: {missing[0].path}); run `medseg data fetch {dataset} --mirror DIR` "
            f"(or without --mirror to download), with --dest {root} if that is not the default"
        )
    if verify:
        corrupt = [e for e in entries if sha256_file(e.local_path(root)) != e.sha256]
        if corrupt:
            raise ManifestError(
                f"{len(corrupt)} files of {dataset} under {root / dataset} fail their checksum "
                f"(first: {corrupt[0].path}); run `medseg data fetch {dataset} --mirror DIR --force`"
            )
    images = {e.case: e for e in entries if e.role == "image"}
    labels = {e.case: e for e in entries if e.role == "label"}
    return [
        CaseFiles(
            case,
            images[case].local_path(root),
            labels[case].local_path(root) if case in labels else None,
        )
        for case in sorted(images, key=natural_key)
    ]
