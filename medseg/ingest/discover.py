"""Find the scans in a folder tree: which files form which scan, and what cannot be used.

File names are hints only: DICOM files are recognised by content (any name, with or
without extension), DICOM series are grouped by SeriesInstanceUID across the whole tree,
and numbered images in one folder form one stack. Every file ends up in exactly one of
``scans``, ``instance_masks`` (reference masks of a scan, see below), ``problems`` (bad
input, with the reason) or ``skipped`` (not a scan, with a note).

The per-image instance layout (Kaggle Data Science Bowl 2018 nuclei) is recognised from
the folders alone, where that is unambiguous: a case folder holding ``images/`` with
exactly one image and a ``masks/`` folder is one scan, id the case folder, whose masks
(one binary image per object) are its instance labels, listed under the scan's id in
``instance_masks``. Those masks are never scans and never stack into a sequence. An
``images/`` folder holding several images is the other common layout (images/X paired
with masks/X by name), which keeps the ordinary rules.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydicom.dataset import Dataset

from medseg.errors import ScanError
from medseg.files import natural_key, safe_part, unique_names
from medseg.ingest.case_layout import CaseLayout
from medseg.ingest.dicom_headers import non_image_reason, read_dataset
from medseg.ingest.dicom_series import group_series, plan_series
from medseg.ingest.microscopy import tiff_pages
from medseg.ingest.scan import Problem, ScanRef
from medseg.ingest.sniff import sniff, suffix_of

__all__ = ["Discovery", "case_id", "discover", "IMAGE_SUFFIXES", "NIFTI_SUFFIXES", "TIFF_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
# Files that sit beside scans and are never scans themselves.
_NOT_SCANS = {
    ".json",
    ".txt",
    ".csv",
    ".tsv",
    ".md",
    ".yaml",
    ".yml",
    ".xml",
    ".html",
    ".pdf",
    ".pt",
    ".pth",
    ".ckpt",
    ".log",
    ".py",
    ".sh",
    ".zip",
    ".gz",
    ".tar",
    ".mat",
    ".npy",
    ".npz",
}
_CONTENT_FOR_SUFFIX = {
    ".nii": ("nifti",),
    ".nii.gz": ("gzip",),
    ".tif": ("tiff",),
    ".tiff": ("tiff",),
    ".png": ("png",),
    ".jpg": ("jpeg",),
    ".jpeg": ("jpeg",),
    ".bmp": ("bmp",),
}
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


@dataclass
class Discovery:
    """Result of ``discover``: usable scans, bad inputs and files that are not scans."""

    root: Path
    scans: list[ScanRef] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    # scan id -> its instance masks (kind "instance-masks"), for scans in the per-image layout
    instance_masks: dict[str, ScanRef] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "scans": [{"id": s.id, "kind": s.kind, "files": len(s.paths), "path": str(s.path)} for s in self.scans],
            "instance_masks": {i: [str(p) for p in ref.paths] for i, ref in self.instance_masks.items()},
            "problems": [p.to_dict() for p in self.problems],
            "skipped": [p.to_dict() for p in self.skipped],
        }


def discover(folder: Path | str, stack_sequences: bool = True) -> Discovery:
    """Scans under ``folder`` (a folder tree or a single file), sorted by id.

    stack_sequences: numbered 2D images in one folder (0.png, 1.png, ...) form one
    z-stack; False keeps each image a scan of its own (training on slices).
    """
    root = Path(folder)
    if not root.exists():
        raise ScanError(root, "does not exist", "check the path")
    if not root.is_dir() and not root.is_file():  # opening a pipe would wait for a writer, a device never ends
        raise ScanError(root, "is not a regular file or folder (a pipe, socket or device)", "point at scans")
    result = Discovery(root=root)
    files = [root] if root.is_file() else list(_walk(root, result))
    base = root.parent if root.is_file() else root
    dicom_headers: dict[Path, Dataset] = {}
    planes_by_folder: dict[Path, list[Path]] = defaultdict(list)
    layout = CaseLayout(root if root.is_dir() else None, IMAGE_SUFFIXES + TIFF_SUFFIXES)
    for path in files:
        part = layout.part_of(path)
        if part is not None and suffix_of(path) in IMAGE_SUFFIXES + TIFF_SUFFIXES:
            if _usable_plane(path, result):
                layout.files[part[0]][part[1]].append(path)
        else:
            _classify(path, base, result, dicom_headers, planes_by_folder)
    _add_dicom_series(dicom_headers, base, result)
    for folder_path, planes in planes_by_folder.items():
        _add_planes(folder_path, planes, base, result, stack_sequences and not layout.is_masks_folder(folder_path))
    masks = _add_layout_cases(layout, base, result)
    _make_ids_unique(result)
    result.instance_masks = {
        scan.id: ScanRef(scan.id, "instance-masks", masks[scan.paths[0]])
        for scan in result.scans
        if scan.paths[0] in masks
    }
    result.scans.sort(key=lambda s: natural_key(s.id))
    return result


def _usable_plane(path: Path, result: Discovery) -> bool:
    """A 2D image of the per-image layout whose content matches its name; else a problem is recorded."""
    if _content(path, suffix_of(path), result) is None:
        return False
    if suffix_of(path) in TIFF_SUFFIXES:
        try:
            pages = tiff_pages(path)
        except ScanError as exc:
            result.problems.append(Problem((path,), exc.problem))
            return False
        if pages > 1:
            result.problems.append(
                Problem((path,), f"a TIFF of {pages} planes in a per-image case folder, which holds 2D images only")
            )
            return False
    return True


def _add_layout_cases(layout: CaseLayout, base: Path, result: Discovery) -> dict[Path, tuple[Path, ...]]:
    """One scan per case folder (its one image); returns image path -> its instance mask files."""
    masks_of: dict[Path, tuple[Path, ...]] = {}
    for case, parts in layout.files.items():
        images, masks = parts["images"], sorted(parts["masks"], key=natural_key)
        if not images:  # its one image was unreadable (a problem already) or not an image
            if masks:
                reason = f"instance masks of {case.name}, whose images/ holds no usable image"
                result.problems.append(Problem(tuple(masks), reason))
            continue
        image = images[0]
        kind = "tiff" if suffix_of(image) in TIFF_SUFFIXES else "image"
        result.scans.append(ScanRef(_rel(case, base) or case.name, kind, (image,)))
        if masks:
            masks_of[image] = tuple(masks)
    return masks_of


def _walk(root: Path, result: Discovery) -> Iterable[Path]:
    """Regular files below root, not following directory links (no loops)."""

    def on_error(exc: OSError) -> None:
        result.problems.append(Problem((Path(exc.filename or root),), f"cannot read folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                result.skipped.append(Problem((path,), "broken symbolic link"))
                continue
            if path.is_file():
                yield path
            else:
                result.skipped.append(Problem((path,), "not a regular file (a pipe, socket or device): not read"))


def _classify(
    path: Path,
    base: Path,
    result: Discovery,
    dicom_headers: dict[Path, Dataset],
    planes_by_folder: dict[Path, list[Path]],
) -> None:
    suffix = suffix_of(path)
    content = _content(path, suffix, result)
    if content is None:
        return
    if suffix in NIFTI_SUFFIXES:
        result.scans.append(ScanRef(_file_id(path, base), "nifti", (path,)))
    elif suffix in TIFF_SUFFIXES:
        try:
            pages = tiff_pages(path)
        except ScanError as exc:
            result.problems.append(Problem((path,), exc.problem))
            return
        if pages > 1:
            result.scans.append(ScanRef(_file_id(path, base), "tiff", (path,)))
        else:
            planes_by_folder[path.parent].append(path)
    elif suffix in IMAGE_SUFFIXES:
        planes_by_folder[path.parent].append(path)
    elif content == "dicom" or (suffix in DICOM_SUFFIXES and content == "unknown"):
        _read_dicom_header(path, suffix, result, dicom_headers)
    elif suffix in DICOM_SUFFIXES and content != "unknown":
        result.problems.append(
            Problem((path,), f"named {suffix or 'without extension'} but holds {content.upper()} content, not DICOM")
        )
    elif suffix in _NOT_SCANS:
        result.skipped.append(Problem((path,), f"not a scan ({suffix} file)"))
    else:
        result.skipped.append(Problem((path,), f"not a scan: unknown file type {suffix!r}"))


def _content(path: Path, suffix: str, result: Discovery) -> str | None:
    """What the file holds (``sniff``), or None with a problem recorded (unreadable, empty, not what its name says)."""
    try:
        content = sniff(path)
    except OSError as exc:
        result.problems.append(Problem((path,), f"cannot read file ({exc.strerror or exc})"))
        return None
    if content == "empty":
        result.problems.append(Problem((path,), "empty file (0 bytes)"))
        return None
    expected = _CONTENT_FOR_SUFFIX.get(suffix)
    if expected and content not in expected:
        shown = "not an image format medseg knows" if content == "unknown" else f"{content.upper()} content"
        result.problems.append(Problem((path,), f"named {suffix} but holds {shown}; rename it to its real format"))
        return None
    return content


def _read_dicom_header(path: Path, suffix: str, result: Discovery, headers: dict[Path, Dataset]) -> None:
    try:
        ds = read_dataset(path, pixels=True)
    except ScanError as exc:
        if suffix == "" and exc.problem == "not a DICOM file":
            result.skipped.append(Problem((path,), "not a scan: neither DICOM nor a known image format"))
        else:
            result.problems.append(Problem((path,), str(exc.problem)))
        return
    reason = non_image_reason(ds)
    if reason:
        result.skipped.append(Problem((path,), reason))
        return
    if "PixelData" in ds:
        del ds.PixelData  # headers only from here on; load() decodes again
    headers[path] = ds


def _add_dicom_series(headers: dict[Path, Dataset], base: Path, result: Discovery) -> None:
    for paths in group_series(headers):
        try:
            plan = plan_series(paths, headers)
        except ScanError as exc:
            result.problems.append(Problem(tuple(paths), exc.problem))
            continue
        folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
        ds = headers[plan.paths[0]]
        result.scans.append(ScanRef(_folder_id(folder, base, ds), "dicom", plan.paths))


def _add_planes(folder: Path, planes: list[Path], base: Path, result: Discovery, stack: bool) -> None:
    """Numbered images sharing a prefix and suffix form one stack; others stand alone."""
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    singles: list[Path] = []
    for path in planes:
        match = _NUMBERED.match(path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name)
        if stack and match:
            groups[(match.group(1), suffix_of(path))].append(path)
        else:
            singles.append(path)
    for (prefix, _suffix), paths in groups.items():
        if len(paths) == 1:
            singles.extend(paths)
            continue
        paths.sort(key=natural_key)
        name = _rel(folder, base)
        prefix = prefix.rstrip("_-. ")
        scan_id = f"{name}/{prefix}" if prefix and name else (prefix or name or folder.name)
        result.scans.append(ScanRef(scan_id, "image-sequence", tuple(paths)))
    for path in singles:
        kind = "tiff" if suffix_of(path) in TIFF_SUFFIXES else "image"
        result.scans.append(ScanRef(_file_id(path, base), kind, (path,)))


def _rel(path: Path, base: Path) -> str:
    try:
        rel = path.relative_to(base)
    except ValueError:
        return path.name
    return "" if str(rel) == "." else rel.as_posix()


def case_id(path: Path, root: Path) -> str:
    """The case id of a file: its path below ``root`` (a folder, or a file's own folder) without suffix.

    The one rule for ids that come from file names, used for scans and for inputs that
    could not be read alike, so a failure is reported under the id its mask would have had.
    """
    base = root.parent if root.is_file() else root
    return _safe_id(_file_id(Path(path), base))


def _safe_id(scan_id: str) -> str:
    """An id whose every ``/``-separated part is a harmless path component (`medseg.files.safe_part`)."""
    return "/".join(safe_part(part) for part in scan_id.split("/") if part) or "_"


def _file_id(path: Path, base: Path) -> str:
    rel = _rel(path, base) or path.name
    suffix = suffix_of(path)
    return rel[: -len(suffix)] if suffix and rel.lower().endswith(suffix) else rel


def _folder_id(folder: Path, base: Path, ds: Dataset) -> str:
    """A series folder's id; several series in one folder get ``/series_N`` (N from the file, so sanitised)."""
    name = _rel(folder, base) or folder.name
    number = str(ds.get("SeriesNumber", "") or "").strip()
    return f"{name}/series_{safe_part(number)}" if number else name


def _make_ids_unique(result: Discovery) -> None:
    """Folders holding one DICOM series keep the folder's id; clashes get a suffix."""
    # A DICOM folder with a single series needs no series suffix.
    safe_ids = [_safe_id(scan.id) for scan in result.scans]
    folder_counts: dict[str, int] = defaultdict(int)
    for scan, scan_id in zip(result.scans, safe_ids):
        if scan.kind == "dicom":
            folder_counts[scan_id.rsplit("/series_", 1)[0]] += 1
    wanted = []
    for scan, scan_id in zip(result.scans, safe_ids):
        if scan.kind == "dicom" and "/series_" in scan_id:
            folder = scan_id.rsplit("/series_", 1)[0]
            if folder_counts[folder] == 1:
                scan_id = folder
        wanted.append(scan_id)
    # Reserve every id first, so a suffix never takes the id of a real file (x.png, x_2.png).
    # Ids compare ignoring case (masks land on case-insensitive shares too), and a stack's PNG
    # masks claim ID/<slice name>, so a lone image there (a/s/s1.png beside stack a/s) gets another id.
    claimed = {
        f"{scan_id}/{name}".casefold(): k
        for k, (scan, scan_id) in enumerate(zip(result.scans, wanted))
        if scan.kind == "image-sequence"
        for name in unique_names([Path(p).stem for p in scan.paths])
    }
    ids = unique_names(wanted, sanitise=False, blocked=lambda k, folded: claimed.get(folded, k) != k)
    renamed = [ScanRef(scan_id, scan.kind, scan.paths) for scan, scan_id in zip(result.scans, ids)]
    result.scans[:] = renamed
