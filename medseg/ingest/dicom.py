"""DICOM series and multi-frame images → channel-first array + RAS affine.

Slices are ordered by their position projected on the slice normal (never by file name
or InstanceNumber), slice spacing comes from those positions (never SliceThickness), and
oblique planes keep their full direction cosines. Every way a series can be inconsistent
is an error that names the series and its files.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    PositronEmissionTomographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import validate_value

from medseg.errors import ScanError
from medseg.geometry import Geometry, check_geometry, check_values, lps_to_ras
from medseg.ingest.budget import check_budget, check_frame_count, dicom_nbytes
from medseg.ingest import dicom_pixels
from medseg.ingest.dicom_pixels import preferred_plugin, read_volume
from medseg.ingest.scan import LoadOptions, Scan, ScanRef

__all__ = [
    "PATIENT_STUDY_ATTRIBUTES",
    "DicomSeries",
    "group_series",
    "load_dicom",
    "non_image_reason",
    "plan_series",
    "read_dataset",
    "source_identifiers",
    "valid_uid",
]

# Objects that hold no image to segment: reported as skipped, not as errors.
NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTRECORD": "RT treatment record",
    "RTDOSE": "RT dose grid",
    "SEG": "segmentation object",
    "KO": "key object selection",
    "PR": "presentation state",
    "DOC": "encapsulated document",
    "REG": "registration",
    "ECG": "waveform",
    "HD": "waveform",
    "AU": "audio",
}

# Relative tolerance on slice spacing; a missing slice doubles one gap.
SPACING_TOLERANCE = 0.02
# SliceThickness within this (mm, plus SPACING_TOLERANCE of the spacing) of the slice spacing: no note.
THICKNESS_TOLERANCE_MM = 0.01
# Largest angle (radians) between the stacking direction and the slice normal before
# the series counts as gantry-tilted.
TILT_TOLERANCE = 1e-3
# Direction cosines that differ by more than this are different orientations.
ORIENTATION_TOLERANCE = 1e-4

# Type 2 attributes of the Patient and General Study modules: every object of a study,
# a DICOM SEG included, carries them, empty when unknown. Anonymisers often delete them.
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Image storage classes whose IOD makes the Frame of Reference module mandatory.
_FRAME_OF_REFERENCE_REQUIRED = {
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
}
# Value representations held as text (pydicom parses some, e.g. DS and PN, into objects).
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
# PS3.5 9.1: digits in dot-separated components, no leading zeros, at most 64 characters.
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    """Read one DICOM file, with or without preamble; ScanError if it is not DICOM."""
    return _read(path, pixels)[0]


def _read_header(path: Path) -> tuple[Dataset, int | None]:
    """One file's header (read as ``read_dataset(path, pixels=False)``) and where its pixel data starts.

    The offset lets the pixel pass read only the pixel data elements (``_attach_pixels``)
    instead of parsing the header a second time; None where the file offers no such place
    (deflated transfer syntax: the dataset was read from an inflated copy).
    """
    return _read(path, False)


def _read(path: Path, pixels: bool) -> tuple[Dataset, int | None]:
    try:
        with warnings.catch_warnings(), open(path, "rb") as fp:
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=not pixels)
            except InvalidDicomError:
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=not pixels, force=True)
                if "SOPClassUID" not in ds and "Rows" not in ds:
                    raise ScanError(path, "not a DICOM file", "remove it from the folder or give it its real extension")
            deflated = _text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            offset = None if pixels or deflated else fp.tell()
    except ScanError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ScanError(
            path, f"unreadable DICOM file ({exc})", "the file is probably truncated or corrupt; re-export it"
        ) from exc
    if pixels and non_image_reason(ds) is None:
        _check_pixel_length(path, ds)
    return ds, offset


def non_image_reason(ds: Dataset) -> str | None:
    """Why a DICOM object holds no image to segment (SR, RTSTRUCT, SEG...), else None."""
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} ({NON_IMAGE_MODALITIES[modality]}) holds no image to segment"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "structured report holds no image to segment"
    if "Rows" not in ds and "PixelData" not in ds:
        sop = sop_class or str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
        if not sop or "Image Storage" in pydicom.uid.UID(sop).name:
            return None  # an image whose header is cut short: reading reports it as an error
        return f"{modality or 'object'} without image attributes holds no image to segment"
    return None


def _check_pixel_length(path: Path, ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise ScanError(
            path,
            "DICOM image has no pixel data",
            "the export from the PACS/scanner is incomplete; re-export the series",
        )
    if ds.file_meta.get("TransferSyntaxUID") and ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = _native_pixel_bytes(ds)
    actual = len(ds.PixelData)
    if expected and actual < expected:
        raise ScanError(
            path,
            f"truncated DICOM file: pixel data has {actual} bytes, the header declares {expected}",
            "the copy is incomplete; copy or re-export the file again",
        )


def _native_pixel_bytes(ds: Dataset) -> int:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return 0
    if bits == 1:
        return (rows * cols * samples * frames + 7) // 8
    return rows * cols * samples * frames * (bits // 8)


def _floats(value: Any, n: int, path: Path, name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScanError(
            path, f"{name} is not numeric ({value!r})", "the header is corrupt; re-export the series"
        ) from exc
    if arr.shape != (n,):
        raise ScanError(
            path, f"{name} has {arr.size} values, expected {n}", "the header is corrupt; re-export the series"
        )
    return check_values(path, name, arr)  # every caller reads geometry: NaN/Inf is refused here, by name


def _get(ds: Dataset, name: str, path: Path) -> Any:
    """An attribute's value; pydicom converts on access, so a malformed value raises here."""
    try:
        return ds.get(name)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ScanError(path, f"{name} is malformed ({exc})", "the header is corrupt; re-export the file") from exc


def _int(ds: Dataset, name: str, path: Path, default: int | None = None) -> int:
    """An integer attribute, or ScanError naming it when it is missing or not a number."""
    value = _get(ds, name, path)
    if _blank(value):
        if default is not None:
            return default
        raise ScanError(path, f"DICOM image has no {name}", "the header is incomplete; re-export the file")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ScanError(
            path, f"{name} is not an integer ({value!r})", "the header is corrupt; re-export the file"
        ) from exc


def _float(value: Any, path: Path, name: str, default: float) -> float:
    if _blank(value):
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ScanError(
            path, f"{name} is not a number ({value!r})", "the header is corrupt; re-export the file"
        ) from exc


def _blank(value: Any) -> bool:
    return value is None or str(value).strip() == ""


def series_key(ds: Dataset) -> tuple:
    """Group key: SeriesInstanceUID, else frame of reference + orientation + matrix size."""
    uid = ds.get("SeriesInstanceUID")
    if not _blank(uid):
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
    frames = [_int(ds, "NumberOfFrames", p, default=1) for p, ds in zip(paths, datasets)]
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
        [(_int(ds, "Rows", p), _int(ds, "Columns", p), _channels_of(ds, p)) for p, ds in zip(paths, datasets)],
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
        [_floats(ds.ImagePositionPatient, 3, p, "ImagePositionPatient") for p, ds in zip(paths, datasets)]
    )
    orientations = np.stack(
        [_floats(ds.ImageOrientationPatient, 6, p, "ImageOrientationPatient") for p, ds in zip(paths, datasets)]
    )
    spacings = np.stack([_pixel_spacing(ds, p) for p, ds in zip(paths, datasets)])
    return _plan_stack(paths, positions, orientations, spacings, datasets[0], series, frames=())


def _pixel_spacing(ds: Dataset, path: Path) -> np.ndarray:
    if "PixelSpacing" in ds:
        return check_values(path, "PixelSpacing", _floats(ds.PixelSpacing, 2, path, "PixelSpacing"), positive=True)
    if "ImagerPixelSpacing" in ds:
        spacing = _floats(ds.ImagerPixelSpacing, 2, path, "ImagerPixelSpacing")
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
    shape = (_int(first, "Columns", who[0]), _int(first, "Rows", who[0]), len(positions))
    tags = "ImagePositionPatient, ImageOrientationPatient, PixelSpacing and slice spacing"
    check_geometry(who, lps_to_ras(lps), shape, f"{series}: {tags}")
    geometry = Geometry(lps_to_ras(lps), shape)
    if frames:
        return DicomSeries(tuple(paths), tuple(int(frames[i]) for i in order), geometry, tuple(notes))
    return DicomSeries(tuple(paths[i] for i in order), (), geometry, tuple(notes))


def _single_slice_thickness(ds: Dataset) -> float | None:
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(name)
        if not _blank(value):
            try:
                return abs(float(value)) or None
            except (TypeError, ValueError):
                continue
    return None


def _header_notes(plan: DicomSeries, datasets: Sequence[Dataset]) -> list[str]:
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
            if _blank(raw):  # enhanced multi-frame: in the pixel measures of the functional groups
                per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [Dataset()]
                shared = _first_item(ds, "SharedFunctionalGroupsSequence")
                raw = _functional(per_frame[0], shared, "PixelMeasuresSequence", "SliceThickness")
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        raw = f"(unreadable: {exc})"
    if _blank(raw):
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
        value = _text(meta, "TransferSyntaxUID") if meta is not None else ""
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
    shape = (_int(ds, "Columns", paths[0]), _int(ds, "Rows", paths[0]), n)
    geometry = Geometry.from_spacing(shape, (spacing[1], spacing[0], 1.0), spacing_known=known)
    check_geometry(paths, geometry.affine, shape, "PixelSpacing and the image size (Columns, Rows, frames)")
    note = "no patient geometry in the header (ImagePositionPatient/ImageOrientationPatient): pixel grid only"
    return DicomSeries(tuple(paths), frames, geometry, (note,), has_geometry=False)


def _plan_multiframe(path: Path, ds: Dataset) -> DicomSeries:
    n = _int(ds, "NumberOfFrames", path, default=1)
    frames = tuple(range(n))
    series = _series_name(ds)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
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
            positions.append(_floats(pos, 3, path, f"frame {i + 1} ImagePositionPatient"))
            orientations.append(_floats(ori, 6, path, f"frame {i + 1} ImageOrientationPatient"))
            spacing = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
            if spacing is not None:
                spacing = check_values(path, "PixelSpacing", _floats(spacing, 2, path, "PixelSpacing"), positive=True)
            spacings.append(spacing if spacing is not None else np.array([np.nan, np.nan]))
        measures = _first_item(shared, "PixelMeasuresSequence") if shared is not None else None
        thickness = None
        if measures is not None:
            thickness = _single_slice_thickness(measures)
        return _plan_stack(
            [path], np.stack(positions), np.stack(orientations), np.stack(spacings), ds, series, frames, thickness
        )
    if "GridFrameOffsetVector" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        offsets = _floats(ds.GridFrameOffsetVector, n, path, "GridFrameOffsetVector")
        origin = _floats(ds.ImagePositionPatient, 3, path, "ImagePositionPatient")
        ori = _floats(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
        normal = np.cross(ori[:3], ori[3:])
        positions = origin + offsets[:, None] * normal
        spacing = _pixel_spacing(ds, path)
        return _plan_stack([path], positions, np.tile(ori, (n, 1)), np.tile(spacing, (n, 1)), ds, series, frames)
    return _plan_without_geometry([path], ds, frames)


def _first_item(ds: Dataset | None, name: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(name)
    return seq[0] if seq else None


def _functional(group: Dataset, shared: Dataset | None, sequence: str, attribute: str) -> Any:
    for source in (group, shared):
        item = _first_item(source, sequence)
        if item is not None and attribute in item:
            return item.get(attribute)
    return None


def _rescale(ds: Dataset, frame: Dataset | None, shared: Dataset | None, path: Path) -> tuple[float, float]:
    source = ds
    for group in (frame, shared):
        item = _first_item(group, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item:
            source = item
            break
    slope = _float(_get(source, "RescaleSlope", path), path, "RescaleSlope", 1.0)
    intercept = _float(_get(source, "RescaleIntercept", path), path, "RescaleIntercept", 0.0)
    if slope == 0.0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise ScanError(
            path,
            f"RescaleSlope/Intercept {slope}/{intercept} cannot map stored values",
            "the header is corrupt; re-export the file",
        )
    return slope, intercept


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    """The file's pixels as pydicom decodes them: first with ``preferred_plugin`` (faster, same
    values), then, if that fails, with pydicom's own choice of plugin."""
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plugin = preferred_plugin(syntax)
            if plugin:
                try:
                    return pixel_array(ds, decoding_plugin=plugin)
                except Exception:  # noqa: BLE001 - an exotic header or codestream: pydicom's default below
                    pass
            return pixel_array(ds)  # what ds.pixel_array decodes, without caching it on the dataset
    except Exception as exc:  # pydicom raises many types for bad pixel data
        name = getattr(syntax, "name", str(syntax))
        raise ScanError(
            path,
            f"cannot decode pixel data ({name}): {exc}",
            "the file is corrupt or declares the wrong transfer syntax; re-export it "
            "(for compressed data, check that pylibjpeg and its plugins are installed)",
        ) from exc


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()


def _channels_of(ds: Dataset, path: Path, options: LoadOptions = LoadOptions()) -> int:
    """Channels once decoded: palette indices become RGB, every other image keeps its samples."""
    if options.palette == "rgb" and _photometric(ds) == "PALETTE COLOR":
        return 3
    return _int(ds, "SamplesPerPixel", path, default=1)


def _as_displayed(path: Path, ds: Dataset, pixels: np.ndarray, options: LoadOptions) -> tuple[np.ndarray, str | None]:
    """Stored values in the sense a viewer shows them, so that every series means brighter by higher.

    A model trained on MONOCHROME2 images would see a MONOCHROME1 radiograph (CR, DX, MG)
    as a negative, and a PALETTE COLOR image as arbitrary indices. YBR is already RGB here:
    pydicom converts it when decoding. A mask (``palette="indices"``) keeps its stored
    values: they are class values, not brightness.
    """
    kind = _photometric(ds) if options.palette == "rgb" else "MONOCHROME2"
    if kind == "MONOCHROME1":
        bits = _int(ds, "BitsStored", path, default=8 * pixels.dtype.itemsize)
        signed = _int(ds, "PixelRepresentation", path, default=0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        inverted = (lo + hi) - pixels.astype(np.int64)
        return inverted.astype(
            pixels.dtype
        ), "MONOCHROME1 inverted so that higher values are brighter (as a viewer shows it)"
    if kind == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(pixels, ds)
        except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise ScanError(
                path,
                f"PALETTE COLOR image without a usable colour lookup table ({exc})",
                "the header is incomplete; re-export the image as RGB or greyscale",
            ) from exc
        return rgb, "palette indices mapped to RGB through the file's colour lookup table"
    return pixels, None


# The elements from the pixel data on: what a header read with stop_before_pixels leaves out.
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def _attach_pixels(path: Path, header: Dataset, offset: int | None) -> tuple[Dataset, tuple[int, ...]]:
    """``header`` with its file's pixel data elements read from ``offset``, and the tags added.

    Why: parsing a header again costs about a fifth of loading a native series; the pixel
    data starts where the header read stopped. Anything unexpected there (no pixel element
    first, a parse error, no offset) reads the whole file again, as before, and that read
    reports what is wrong.
    """
    if offset is not None:
        try:
            with warnings.catch_warnings(), open(path, "rb") as fp:
                warnings.simplefilter("ignore")
                fp.seek(offset)
                implicit, little = header.original_encoding
                tail = pydicom.filereader.read_dataset(fp, implicit, little)
            tags = tuple(int(tag) for tag in tail.keys() if int(tag) in _PIXEL_TAGS and tag not in header)
        except Exception:  # noqa: BLE001 - the full read below names the problem
            tags = ()
        if tags and int(next(iter(tail.keys()))) in _PIXEL_TAGS:
            for tag in tags:
                header[tag] = tail.get_item(tag)
            try:
                _check_pixel_length(path, header)
            except ScanError:
                _detach(header, tags)
                raise
            return header, tags
    return read_dataset(path), ()


def _detach(header: Dataset, tags: tuple[int, ...]) -> None:
    for tag in tags:
        del header[tag]


def _read_slice(path: Path, header: Dataset, offset: int | None, options: LoadOptions) -> tuple[np.ndarray, str | None]:
    """One file of a series, its header already read: its pixels as displayed, and the conversion note."""
    ds, tags = _attach_pixels(path, header, offset)
    try:
        return _as_displayed(path, ds, _decode(path, ds), options)
    finally:
        _detach(ds, tags)


def _series_syntax(datasets: Iterable[Dataset]) -> str | None:
    """The transfer syntax every file of the series shares; None when they differ."""
    syntaxes = {_text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID") for ds in datasets}
    return syntaxes.pop() if len(syntaxes) == 1 else None


def load_dicom(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """Load a DICOM series (or one multi-frame file) named by ``ref``."""
    read = {p: _read_header(p) for p in ref.paths}
    headers = {p: ds for p, (ds, _) in read.items()}
    for path, ds in headers.items():
        reason = non_image_reason(ds)
        if reason:
            raise ScanError(path, reason, "point medseg at the image series, not at this object")
    plan = plan_series(list(ref.paths), headers)
    first = headers[plan.paths[0]]
    samples = _channels_of(first, plan.paths[0], options)
    slices_declared = len(plan.frame_order) or len(plan.paths)
    what = f"the decoded DICOM pixel data ({slices_declared} slice(s) of {first.get('Rows')} x {first.get('Columns')})"
    check_budget(ref.path, dicom_nbytes(plan.paths[0], first, slices_declared, samples), what, options.memory_budget_mb)
    # Each slice is decoded straight into the volume (medseg.ingest.dicom_pixels), a file per thread
    # where the decoder releases the GIL; ``shown`` collects the slices' conversion notes (None: kept as stored).
    if plan.frame_order:
        ds = first
        pixels, note = _read_slice(plan.paths[0], first, read[plan.paths[0]][1], options)
        if pixels.ndim == (3 if samples > 1 else 2):
            pixels = pixels[None]
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
        slopes = [_rescale(ds, per_frame[f] if per_frame else None, shared, plan.paths[0]) for f in plan.frame_order]
        sop_uids = [str(ds.get("SOPInstanceUID", "") or "")]
        frames = plan.frame_order
        array, shown = read_volume(lambda k: (pixels[frames[k]], note), plan.paths * len(frames), slopes, samples)
    else:  # rescale and UIDs from the headers already read; each worker reads only its file's pixel data
        slopes = [_rescale(headers[p], None, None, p) for p in plan.paths]
        sop_uids = [str(headers[p].get("SOPInstanceUID", "") or "") for p in plan.paths]
        workers = dicom_pixels.default_workers(_series_syntax(headers[p] for p in plan.paths))
        array, shown = read_volume(
            lambda k: _read_slice(plan.paths[k], headers[plan.paths[k]], read[plan.paths[k]][1], options),
            plan.paths,
            slopes,
            samples,
            workers,
        )
    array, color_notes = _color(array, options, samples)
    files = list(plan.paths[:1]) if plan.frame_order else list(plan.paths)
    identifiers, id_notes = source_identifiers(files, [headers[p] for p in files], sop_uids, plan)
    return Scan(
        ref=ref,
        array=array,
        geometry=plan.geometry,
        modality=str(first.get("Modality", "") or "OT"),
        metadata={**_metadata(first, sop_uids, plan.frame_order), **identifiers},
        notes=list(plan.notes)
        + _header_notes(plan, [headers[p] for p in plan.paths])
        + sorted(n for n in shown if n is not None)
        + color_notes
        + id_notes,
    )


def valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID by PS3.5 9.1 (dot-separated numbers, no leading zeros, at most 64 characters)."""
    return len(value) <= 64 and _UID_SYNTAX.fullmatch(value) is not None


def _text(ds: Dataset, name: str) -> str:
    try:
        value = ds.get(name)
    except (ValueError, TypeError, OverflowError):
        return ""
    return "" if value is None else str(value).strip()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identifiers(
    paths: Sequence[Path], datasets: Sequence[Dataset], sop_uids: Sequence[str], plan: DicomSeries
) -> tuple[dict[str, Any], list[str]]:
    """The UIDs a derived object (DICOM SEG) must reference, filled in where the files leave them blank.

    Anonymisers blank or delete identifiers (SOP Class/Instance, Study, Series, Frame of
    Reference UIDs) and Type 2 patient/study attributes; a SEG cannot reference such a
    series as it stands. Blank, malformed or (within the series) duplicated SOP Instance
    UIDs are derived from each file's content, and the series-level UIDs from those, so
    every read of the same files gives the same UIDs and the reader and SEG writer agree.
    The SOP Class comes from the file meta information, else from Modality and the image
    modules present (PS3.3 A.3 CT, A.4 MR, A.21 PET), else Secondary Capture.
    ``paths``, ``datasets`` and ``sop_uids`` are in slice order (one entry for a
    multi-frame file). Returns metadata entries and notes saying what was generated.
    """
    generated: dict[str, Any] = {}
    notes: list[str] = []
    counts = Counter(sop_uids)
    instances = []
    for index, (path, uid) in enumerate(zip(paths, sop_uids)):
        if valid_uid(uid) and counts[uid] == 1:
            instances.append(uid)
        else:
            derived = generate_uid(entropy_srcs=["medseg SOPInstanceUID", _file_digest(path), str(index)])
            instances.append(derived)
            generated.setdefault("SOPInstanceUID", []).append(derived)
    first = datasets[0]
    found = {
        name: _text(first, name)
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID")
    }
    sop_class, how = found["SOPClassUID"], ""
    if not valid_uid(sop_class):
        sop_class, how = _infer_sop_class(first, bool(plan.frame_order), plan.has_geometry)
        generated["SOPClassUID"] = sop_class
        notes.append(
            f"SOPClassUID {'blank' if not found['SOPClassUID'] else 'malformed'} in the files: "
            f"{pydicom.uid.UID(sop_class).name} ({sop_class}) {how}"
        )
    values = {"SOPClassUID": sop_class}
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        value = found[name]
        needed = name != "FrameOfReferenceUID" or plan.has_geometry or sop_class in _FRAME_OF_REFERENCE_REQUIRED
        if not valid_uid(value):
            value = generate_uid(entropy_srcs=[f"medseg {name}", *instances]) if needed else ""
            if value:
                generated[name] = value
        values[name] = value
    made = [
        name
        for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
        if name in generated
    ]
    if made:
        shown = [
            f"SOPInstanceUID ({len(generated[n])} of {len(instances)} files)" if n == "SOPInstanceUID" else n
            for n in made
        ]
        notes.append(
            f"{', '.join(shown)} blank, malformed or duplicated in the files: generated from the file contents "
            "(the same on every read) so that a DICOM SEG can reference the series; see metadata generated_uids"
        )
    missing = [name for name in PATIENT_STUDY_ATTRIBUTES if name not in first]
    if missing:
        notes.append(f"{', '.join(missing)} missing from the header: a DICOM SEG carries them empty (DICOM type 2)")
    malformed = _malformed_attributes(first)
    if malformed:
        notes.append(
            f"{', '.join(malformed)} not valid for their DICOM value representation: a DICOM SEG leaves them "
            "out (or empty, where DICOM type 2 requires them)"
        )
    metadata = {
        "study_instance_uid": values["StudyInstanceUID"],
        "series_instance_uid": values["SeriesInstanceUID"],
        "frame_of_reference_uid": values["FrameOfReferenceUID"],
        "sop_class_uid": values["SOPClassUID"],
        "sop_instance_uids": instances,
        "generated_uids": generated,
        "missing_attributes": missing,
        "malformed_attributes": malformed,
    }
    return metadata, notes


def _malformed_attributes(ds: Dataset) -> list[str]:
    """Keywords of top-level public attributes whose values their VR does not allow (UIDs are handled apart).

    A derived object copies the patient and study attributes of its source; a date like
    '01/02/2020' or a 100-character patient name would make it invalid (or make highdicom
    refuse to build it), so the SEG writer drops what this lists.
    """
    bad = []
    for tag in list(ds.keys()):
        if tag.is_private or tag.group in (0x0002, 0x7FE0):
            continue
        try:
            with warnings.catch_warnings():  # pydicom warns about the very values this collects
                warnings.simplefilter("ignore")
                elem = ds[tag]
            if elem.VR in ("SQ", "UI") or elem.value is None:
                continue
            items = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            for item in items:
                validate_value(elem.VR, str(item) if elem.VR in _TEXT_VRS else item, config.RAISE)
        except (ValueError, TypeError, KeyError, OverflowError):
            keyword = pydicom.datadict.keyword_for_tag(tag)
            if keyword:
                bad.append(keyword)
    return bad


def _infer_sop_class(ds: Dataset, multiframe: bool, has_geometry: bool) -> tuple[str, str]:
    """The storage class a header with a blank SOPClassUID fits, and why (for the note)."""
    meta = getattr(ds, "file_meta", None)
    stored = _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if valid_uid(stored):
        return stored, "taken from the file meta information (MediaStorageSOPClassUID)"
    modality = _text(ds, "Modality").upper()
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if modality == "CT" or (not modality and "KVP" in ds):
        if enhanced:
            return EnhancedCTImageStorage, "inferred from Modality CT and the per-frame functional groups"
        if has_geometry and not multiframe and "RescaleIntercept" in ds:
            return CTImageStorage, "inferred from Modality CT, the image plane and the CT rescale attributes"
    if modality == "MR" or (
        not modality and any(k in ds for k in ("EchoTime", "RepetitionTime", "MagneticFieldStrength"))
    ):
        if enhanced:
            return EnhancedMRImageStorage, "inferred from Modality MR and the per-frame functional groups"
        if has_geometry and not multiframe:
            return MRImageStorage, "inferred from Modality MR and the image plane attributes"
    if modality == "PT":
        if enhanced:
            return EnhancedPETImageStorage, "inferred from Modality PT and the per-frame functional groups"
        if has_geometry and not multiframe:
            return PositronEmissionTomographyImageStorage, "inferred from Modality PT and the image plane attributes"
    if multiframe:
        if _text(ds, "SamplesPerPixel") == "3":
            return (
                MultiFrameTrueColorSecondaryCaptureImageStorage,
                "assumed: a multi-frame colour image of no known modality",
            )
        if _text(ds, "BitsAllocated") == "8":
            return (
                MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                "assumed: a multi-frame 8-bit image of no known modality",
            )
        return MultiFrameGrayscaleWordSecondaryCaptureImageStorage, "assumed: a multi-frame image of no known modality"
    return SecondaryCaptureImageStorage, "assumed: the header matches no modality-specific image IOD"


def _color(array: np.ndarray, options: LoadOptions, samples: int) -> tuple[np.ndarray, list[str]]:
    if samples == 1:
        return array, []
    notes = []
    if samples == 4:
        array = array[:3]
        notes.append("alpha channel dropped")
    if options.color == "grey":
        weights = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32).reshape((3,) + (1,) * (array.ndim - 1))
        return (array.astype(np.float32) * weights).sum(axis=0, keepdims=True), notes + ["RGB converted to grey"]
    return array, notes


def _metadata(ds: Dataset, sop_uids: list[str], frames: Iterable[int]) -> dict[str, Any]:
    def text(name: str) -> str:
        value = ds.get(name)
        return "" if value is None else str(value)

    return {
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "frame_of_reference_uid": text("FrameOfReferenceUID"),
        "sop_class_uid": text("SOPClassUID"),
        "sop_instance_uids": sop_uids,
        "frame_order": [int(f) + 1 for f in frames],  # DICOM frame numbers, 1-based
        "series_description": text("SeriesDescription"),
        "series_number": text("SeriesNumber"),
        "modality": text("Modality"),
        "transfer_syntax": str(getattr(ds.file_meta.get("TransferSyntaxUID", ""), "name", "")),
    }
