"""The data manifest: which files make up each dataset, their checksums, splits and folds.

``data_manifest.csv`` has one row per file. A manifest can come from anywhere, so every row is
checked before use: plain dataset names (they become folder names), relative paths that stay
inside the dataset folder, sha256 sums, known roles and splits. ``medseg.data.fetch`` brings the
files; ``dataset_status`` says what is on disk and verified.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

import medseg
from medseg.errors import ManifestError
from medseg.files import natural_key, sha256_file

__all__ = [
    "COLUMNS",
    "OPTIONAL_COLUMNS",
    "ROLES",
    "SPLITS",
    "CaseFiles",
    "DatasetStatus",
    "ManifestEntry",
    "Opener",
    "dataset_files",
    "dataset_status",
    "entries_for",
    "default_data_root",
    "default_manifest_path",
    "default_mirror",
    "read_manifest",
]


COLUMNS = ("dataset", "case", "role", "path", "sha256", "split", "source_url", "licence")
# size: bytes, a download is cut off as soon as it grows past it; fold: a fixed cross-validation
# fold (0, 1, ...) that `data.split.mode: kfold` uses instead of drawing one, so runs compare.
OPTIONAL_COLUMNS = ("size", "fold")


ROLES = ("image", "label")
SPLITS = ("train", "val", "test")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # dataset ids become folder names
_DRIVE = re.compile(r"^[A-Za-z]:")
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
    if len(problems) == 1:  # it names the manifest and its line already: one line
        raise ManifestError(f"invalid manifest: {problems[0]}")
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


def entries_for(dataset: str, manifest: Path | None) -> list[ManifestEntry]:
    entries = read_manifest(manifest)
    chosen = [e for e in entries if e.dataset == dataset]
    if not chosen:
        known = ", ".join(sorted({e.dataset for e in entries})) or "none"
        where = manifest or default_manifest_path()
        raise ManifestError(f"unknown dataset {dataset!r} in {where}; known datasets: {known}")
    return chosen


# --------------------------------------------------------------------------- checksums and copying


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
    entries = [e for e in entries_for(dataset, manifest) if splits is None or e.split in splits]
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
