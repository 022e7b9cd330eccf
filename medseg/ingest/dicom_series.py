"""Group DICOM files into series and plan each one's geometry from its headers alone.

Slices are ordered by their position projected on the slice normal (never by file name
or InstanceNumber), slice spacing comes from those positions (never SliceThickness), and
oblique planes keep their full direction cosines. Every way a series can be inconsistent
is an error that names the series and its files; what is odd but usable becomes a note.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg.errors import ScanError
from medseg.geometry import Geometry, check_geometry, check_values, lps_to_ras
from medseg.ingest.budget import check_frame_count
from medseg.ingest.dicom_headers import channels_of, text_tag
from medseg.ingest.dicom_headers import (
    ORIENTATION_TOLERANCE,
    SPACING_TOLERANCE,
    THICKNESS_TOLERANCE_MM,
    TILT_TOLERANCE,
    is_blank,
    float_values,
    int_tag,
    read_dataset,
)

__all__ = ["DicomSeries", "first_item", "group_series", "header_notes", "plan_series", "series_key"]


def series_key(ds: Dataset) -> tuple:
    """Group key: SeriesInstanceUID, else frame of reference + orientation + matrix size."""
    uid = ds.get("SeriesInstanceUID")
    if not is_blank(uid):
        return ("uid", str(uid))
    iop = ds.get("ImageOrientationPatient")
    iop_key = tuple(round(float(v), 4) for v in iop) if iop else ()
    return ("fallback", str(ds.get("FrameOfReferenceUID", "")), iop_key, ds.get("Rows"), ds.get("Columns"))


def group_series(headers: dict[Path, Dataset]) -> list[list[Path]]:
    """Files grouped into series, each group in path order (ordering comes later)."""
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for path, ds in headers.items():
        groups[series_key(ds)].append(path)
    return [sorted(paths) for paths in groups.values()]


@dataclass(frozen=True)
class DicomSeries:
    """A validated series: files (or frames) in spatial order and the grid they form."""

    paths: tuple[Path, ...]
    frame_order: tuple[int, ...]  # for multi-frame files; () for a single-frame series
    geometry: Geometry
    notes: tuple[str, ...]
    has_geometry: bool = True  # False: no ImagePositionPatient/ImageOrientationPatient, a pixel grid only


def plan_series(paths: Sequence[Path], headers: dict[Path, Dataset] | None = None) -> DicomSeries:
    """Order and validate a series from its headers, without decoding pixels."""
    headers = headers or {p: read_dataset(p, pixels=False) for p in paths}
    datasets = [headers[p] for p in paths]
    frames = [int_tag(ds, "NumberOfFrames", p, default=1) for p, ds in zip(paths, datasets)]
    for p, ds, n in zip(paths, datasets, frames):
        if n != 1:  # below 1, or more than the file can hold: refused before any list of n frames is built
            check_frame_count(p, ds, n)
    if len(paths) == 1 and (frames[0] > 1 or "PerFrameFunctionalGroupsSequence" in datasets[0]):
        return _plan_multiframe(paths[0], datasets[0])
    multi = [p for p, n in zip(paths, frames) if n > 1]
    if multi:
        raise ScanError(
            multi,
            f"series mixes multi-frame files with {len(paths) - len(multi)} other files",
            "keep each multi-frame image in a folder (or series) of its own",
        )
    return _plan_single_frames(list(paths), datasets)


def _series_name(ds: Dataset) -> str:
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    return f"series '{desc}' ({uid})" if desc else f"series {uid or '(no SeriesInstanceUID)'}"


def _check_same(paths: Sequence[Path], values: list, what: str, series: str, fix: str) -> None:
    distinct = {}
    for path, value in zip(paths, values):
        distinct.setdefault(value, []).append(path)
    if len(distinct) > 1:
        parts = "; ".join(f"{v} in {len(ps)} files (e.g. {ps[0].name})" for v, ps in distinct.items())
        raise ScanError(paths, f"{series} mixes {what}: {parts}", fix)


def _plan_single_frames(paths: list[Path], datasets: list[Dataset]) -> DicomSeries:
    series = _series_name(datasets[0])
    _check_same(
        paths,
        [(int_tag(ds, "Rows", p), int_tag(ds, "Columns", p), channels_of(ds, p)) for p, ds in zip(paths, datasets)],
        "image sizes (rows, columns, colour channels)",
        series,
        "split the files into one folder per image size; they are not one volume",
    )
    missing = [
        p for p, ds in zip(paths, datasets) if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds
    ]
    if missing:
        if len(paths) == 1:
            return _plan_without_geometry(paths, datasets[0], frames=())
        raise ScanError(
            missing,
            f"{series}: {len(missing)} of {len(paths)} files have no ImagePositionPatient/ImageOrientationPatient, "
            "so the slices cannot be placed in space",
            "re-export the series with patient geometry, or keep only the images that have it",
        )
    positions = np.stack(
        [float_values(ds.ImagePositionPatient, 3, p, "ImagePositionPatient") for p, ds in zip(paths, datasets)]
    )
    orientations = np.stack(
        [float_values(ds.ImageOrientationPatient, 6, p, "ImageOrientationPatient") for p, ds in zip(paths, datasets)]
    )
    spacings = np.stack([_pixel_spacing(ds, p) for p, ds in zip(paths, datasets)])
    return _plan_stack(paths, positions, orientations, spacings, datasets[0], series, frames=())


def _pixel_spacing(ds: Dataset, path: Path) -> np.ndarray:
    if "PixelSpacing" in ds:
        return check_values(path, "PixelSpacing", float_values(ds.PixelSpacing, 2, path, "PixelSpacing"), positive=True)
    if "ImagerPixelSpacing" in ds:
        spacing = float_values(ds.ImagerPixelSpacing, 2, path, "ImagerPixelSpacing")
        return check_values(path, "ImagerPixelSpacing", spacing, positive=True)
    return np.array([np.nan, np.nan])


def _plan_stack(
    paths: list[Path],
    positions: np.ndarray,
    orientations: np.ndarray,
    spacings: np.ndarray,
    first: Dataset,
    series: str,
    frames: tuple[int, ...],
    single_step: float | None = None,
) -> DicomSeries:
    """Shared by single-frame series and multi-frame files: one position per slice."""
    notes: list[str] = []
    who = paths if not frames else paths[:1]
    spread = np.abs(orientations - orientations[0]).max(axis=0).max()
    if spread > ORIENTATION_TOLERANCE:
        _check_same(
            who if not frames else [who[0]] * len(orientations),
            [tuple(np.round(o, 4)) for o in orientations],
            "image orientations (ImageOrientationPatient)",
            series,
            "split the files into one folder per orientation (e.g. axial and sagittal localizers)",
        )
    if np.isnan(spacings).any():
        notes.append("no PixelSpacing in the header: in-plane pixel size set to 1 mm")
        spacings = np.where(np.isnan(spacings), 1.0, spacings)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise ScanError(who, f"{series} mixes pixel spacings", "split the files into one folder per pixel spacing")
    row_cos, col_cos = orientations[0][:3], orientations[0][3:]
    norms = np.linalg.norm(row_cos), np.linalg.norm(col_cos)
    if min(norms) < 0.9 or max(norms) > 1.1 or abs(float(row_cos @ col_cos)) > 1e-2 * norms[0] * norms[1]:
        raise ScanError(
            who,
            f"{series}: ImageOrientationPatient {np.round(orientations[0], 4).tolist()} "
            "is not two orthogonal unit vectors",
            "the header is corrupt; re-export the series",
        )
    row_cos = row_cos / norms[0]
    col_cos = col_cos / norms[1]
    normal = np.cross(row_cos, col_cos)
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    positions = positions[order]
    names = [paths[i].name for i in order] if not frames else [f"frame {frames[i] + 1}" for i in order]
    gaps = np.diff(depth)
    if gaps.size:
        median = float(np.median(gaps))
        dup = np.flatnonzero(gaps < max(1e-3, 1e-3 * abs(median)))
        if dup.size:
            i = int(dup[0])
            raise ScanError(
                who,
                f"{series} has slices at duplicate positions ({dup.size} pairs; "
                f"e.g. {names[i]} and {names[i + 1]} both at {depth[i]:.3f} mm along the slice normal)",
                "the folder holds more than one acquisition (echoes, phases, repeats); "
                "split them into separate folders",
            )
        off = np.flatnonzero(np.abs(gaps - median) > 0.01 + SPACING_TOLERANCE * median)
        if off.size:
            i = int(off[0])
            raise ScanError(
                who,
                f"{series} has non-uniform slice spacing: {gaps[i]:.3f} mm between {names[i]} and {names[i + 1]} "
                f"where the series spacing is {median:.3f} mm ({off.size} irregular gaps); slices are probably missing",
                "add the missing slices, or remove the incomplete series",
            )
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        along = float(step @ normal)
        lateral = float(np.linalg.norm(step - along * normal))
        angle = float(np.arctan2(lateral, abs(along)))
        if angle > TILT_TOLERANCE:
            raise ScanError(
                who,
                f"{series} is gantry-tilted by {np.degrees(angle):.2f} degrees "
                "(slices shift sideways along the stack), which a voxel grid cannot represent",
                "resample it to an untilted grid first (e.g. dcm2niix corrects gantry tilt), then load the NIfTI",
            )
    else:
        thickness = single_step or _single_slice_thickness(first)
        if thickness is None:
            thickness = 1.0
            notes.append("single slice without SliceThickness: slice spacing set to 1 mm")
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacings[0][1]  # along a row: column index i, spacing between columns
    lps[:3, 1] = col_cos * spacings[0][0]  # down a column: row index j, spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    shape = (int_tag(first, "Columns", who[0]), int_tag(first, "Rows", who[0]), len(positions))
    tags = "ImagePositionPatient, ImageOrientationPatient, PixelSpacing and slice spacing"
    check_geometry(who, lps_to_ras(lps), shape, f"{series}: {tags}")
    geometry = Geometry(lps_to_ras(lps), shape)
    if frames:
        return DicomSeries(tuple(paths), tuple(int(frames[i]) for i in order), geometry, tuple(notes))
    return DicomSeries(tuple(paths[i] for i in order), (), geometry, tuple(notes))


def _single_slice_thickness(ds: Dataset) -> float | None:
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(name)
        if not is_blank(value):
            try:
                return abs(float(value)) or None
            except (TypeError, ValueError):
                continue
    return None


def header_notes(plan: DicomSeries, datasets: Sequence[Dataset]) -> list[str]:
    """What the headers say about the voxels that the grid does not show: slice overlap or gaps,
    compression, a detector pixel size taken for the patient's.

    Why: each changes what the voxels mean without changing where they lie, so the mask
    overlays the scan exactly and a reviewer would still be misled without the note.
    ``datasets`` in slice order (one for a multi-frame file).
    """
    first = datasets[0]
    notes = []
    if plan.has_geometry and plan.geometry.shape[2] > 1:
        notes.append(_thickness_note(first, plan.geometry.spacing[2]))
    enhanced = "PerFrameFunctionalGroupsSequence" in first  # pixel measures in functional groups, never Imager*
    if "PixelSpacing" not in first and "ImagerPixelSpacing" in first and not enhanced:
        notes.append(
            "no PixelSpacing in the header: ImagerPixelSpacing (measured at the detector) taken as the pixel "
            "size, so sizes in the patient are overstated by the X-ray geometric magnification"
        )
    return [note for note in notes if note] + _compression_notes(datasets)


def _thickness_note(ds: Dataset, spacing: float) -> str | None:
    """SliceThickness against the slice positions' spacing: overlap, gaps, or an unusable value; None if they agree.

    The grid takes its slice spacing from the positions; SliceThickness is the depth each
    slice averages over. Thick slices close together overlap (neighbours share signal);
    thin slices far apart leave tissue between them unimaged, where a small structure can
    hide and a mask is only interpolation. No SliceThickness: nothing to compare, no note.
    """
    try:
        with warnings.catch_warnings():  # pydicom warns about the very values this reports
            warnings.simplefilter("ignore")
            raw = ds.get("SliceThickness")
            if is_blank(raw):  # enhanced multi-frame: in the pixel measures of the functional groups
                per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [Dataset()]
                shared = first_item(ds, "SharedFunctionalGroupsSequence")
                raw = _functional(per_frame[0], shared, "PixelMeasuresSequence", "SliceThickness")
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        raw = f"(unreadable: {exc})"
    if is_blank(raw):
        return None
    try:
        thickness = float(raw)
    except (TypeError, ValueError, OverflowError):
        thickness = math.nan
    if not (math.isfinite(thickness) and thickness > 0):
        return (
            f"SliceThickness {str(raw).strip()[:40]!r} is unusable (not a positive number), so whether slices "
            f"overlap or leave gaps is unknown; the {_mm(spacing)} mm slice spacing comes from the slice positions"
        )
    excess = thickness - spacing
    if abs(excess) <= THICKNESS_TOLERANCE_MM + SPACING_TOLERANCE * spacing:
        return None
    if excess > 0:
        return f"slices {_mm(thickness)} mm thick every {_mm(spacing)} mm: they overlap by {_mm(excess)} mm"
    return f"slices {_mm(thickness)} mm thick every {_mm(spacing)} mm: {_mm(-excess)} mm gaps between them"


def _mm(value: float) -> str:
    """A length for a note: 3.0, 2.5, 0.625 (at most three decimals, at least one); huge values in g format."""
    if not abs(value) < 1e6:
        return f"{value:.4g}"
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _compression_notes(datasets: Sequence[Dataset]) -> list[str]:
    """One note per compressed transfer syntax in the series, named from pydicom's UID dictionary.

    Why: lossy syntaxes (JPEG baseline, JPEG 2000 irreversible) change pixel values, and
    even lossless ones tell a reviewer the files are not as the scanner wrote them.
    A syntax pydicom does not know gets no note: decoding it fails with its own error.
    """
    counts: Counter[str] = Counter()
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        value = text_tag(meta, "TransferSyntaxUID") if meta is not None else ""
        if value:
            counts[value] += 1
    notes = []
    for value, count in counts.items():
        try:
            with warnings.catch_warnings():  # pydicom warns about a malformed UID, which is then simply unknown
                warnings.simplefilter("ignore")
                uid = pydicom.uid.UID(value)
                compressed = uid.is_transfer_syntax and uid.is_compressed
        except ValueError:
            continue
        if compressed:
            share = "" if count == len(datasets) else f" in {count} of {len(datasets)} files"
            notes.append(f"pixels compressed: {uid.name} ({value}){share}")
    return notes


def _plan_without_geometry(paths: Sequence[Path], ds: Dataset, frames: tuple[int, ...]) -> DicomSeries:
    spacing = _pixel_spacing(ds, paths[0])
    known = not np.isnan(spacing).any()
    spacing = np.where(np.isnan(spacing), 1.0, spacing)
    n = len(frames) if frames else 1
    shape = (int_tag(ds, "Columns", paths[0]), int_tag(ds, "Rows", paths[0]), n)
    geometry = Geometry.from_spacing(shape, (spacing[1], spacing[0], 1.0), spacing_known=known)
    check_geometry(paths, geometry.affine, shape, "PixelSpacing and the image size (Columns, Rows, frames)")
    note = "no patient geometry in the header (ImagePositionPatient/ImageOrientationPatient): pixel grid only"
    return DicomSeries(tuple(paths), frames, geometry, (note,), has_geometry=False)


def _plan_multiframe(path: Path, ds: Dataset) -> DicomSeries:
    n = int_tag(ds, "NumberOfFrames", path, default=1)
    frames = tuple(range(n))
    series = _series_name(ds)
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    if per_frame:
        if len(per_frame) != n:
            raise ScanError(
                path, f"{series}: {len(per_frame)} per-frame groups for {n} frames", "the file is corrupt; re-export it"
            )
        positions, orientations, spacings = [], [], []
        for i, group in enumerate(per_frame):
            pos = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
            ori = _functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            if pos is None or ori is None:
                return _plan_without_geometry([path], ds, frames)
            positions.append(float_values(pos, 3, path, f"frame {i + 1} ImagePositionPatient"))
            orientations.append(float_values(ori, 6, path, f"frame {i + 1} ImageOrientationPatient"))
            spacing = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
            if spacing is not None:
                spacing = check_values(
                    path, "PixelSpacing", float_values(spacing, 2, path, "PixelSpacing"), positive=True
                )
            spacings.append(spacing if spacing is not None else np.array([np.nan, np.nan]))
        measures = first_item(shared, "PixelMeasuresSequence") if shared is not None else None
        thickness = None
        if measures is not None:
            thickness = _single_slice_thickness(measures)
        return _plan_stack(
            [path], np.stack(positions), np.stack(orientations), np.stack(spacings), ds, series, frames, thickness
        )
    if "GridFrameOffsetVector" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        offsets = float_values(ds.GridFrameOffsetVector, n, path, "GridFrameOffsetVector")
        origin = float_values(ds.ImagePositionPatient, 3, path, "ImagePositionPatient")
        ori = float_values(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
        normal = np.cross(ori[:3], ori[3:])
        positions = origin + offsets[:, None] * normal
        spacing = _pixel_spacing(ds, path)
        return _plan_stack([path], positions, np.tile(ori, (n, 1)), np.tile(spacing, (n, 1)), ds, series, frames)
    return _plan_without_geometry([path], ds, frames)


def first_item(ds: Dataset | None, name: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(name)
    return seq[0] if seq else None


def _functional(group: Dataset, shared: Dataset | None, sequence: str, attribute: str) -> Any:
    for source in (group, shared):
        item = first_item(source, sequence)
        if item is not None and attribute in item:
            return item.get(attribute)
    return None
