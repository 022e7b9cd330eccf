"""DICOM SEG export (highdicom) for every series medseg can read, real-world exports included.

A SEG references its source: study, series, each instance (SOP Class and Instance UID)
and the frame of reference. Anonymised exports often leave those blank, and highdicom
then fails deep inside (``KeyError: ''``). The loader (medseg.ingest.dicom) therefore
derives the missing identifiers deterministically and records them in the scan's
metadata; this module fills them into copies of the source headers, so the SEG and the
scan report the same UIDs, and Type 2 patient/study attributes that are missing go in
empty, as the standard allows. Each segment is coded from medseg.export.seg_coding (SNOMED CT).
What still cannot become a valid SEG is an ExportError naming the file and the reason,
never a library traceback; the written file is read back (highdicom) and must give the
same label map, so a SEG that would not overlay its scan never leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medseg import __version__
from medseg.errors import ExportError
from medseg.ingest.scan import Scan

__all__ = [
    "checked_mask",
    "dicom_text",
    "segment_descriptions",
    "series_description",
    "series_number_of",
    "source_datasets",
    "sources_and_placement",
    "write_dicom_seg",
]

# A SEG's SeriesNumber: the source's plus this, so it sorts after its source in a viewer.
SERIES_NUMBER_OFFSET = 1000
_IS_MAX = 2**31 - 1
# Characters a DICOM LO/SH value may not hold (PS3.5 6.2): backslash and control characters.
_NOT_TEXT = re.compile(r"[\\\x00-\x1f\x7f]")
# highdicom and pydicom raise these for sources they cannot reference; each becomes an ExportError.
_LIBRARY_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError, OverflowError)


def dicom_text(value: Any, limit: int = 64) -> str:
    """A value fit for a DICOM LO attribute: no backslash or control characters, at most ``limit`` characters."""
    return " ".join(_NOT_TEXT.sub(" ", str(value)).split())[:limit].strip()


def write_dicom_seg(
    mask: np.ndarray,
    scan: Scan,
    path: Path,
    classes: Mapping[str, int],
    algorithm: str = "medseg",
    coding: Mapping[str, Any] | None = None,
) -> Path:
    """DICOM SEG (binary, one segment per class) referencing the source series and its frame of reference.

    ``mask`` holds the label values of ``classes`` on the scan's grid; every class except
    the one valued 0 becomes a segment, numbered in class order, coded by
    ``medseg.export.seg_coding`` (``coding`` is the config's ``data.classes_coding``). Written
    atomically and read back before it replaces ``path``. ExportError when a valid SEG
    cannot be made (the caller still writes the other formats).
    """
    from medseg.files import atomic_path

    mask, segments = checked_mask(mask, scan, path, classes, "a DICOM SEG", "segment")
    sources, placed = sources_and_placement(scan, path)
    if not placed and mask.shape[2] > 1:
        raise ExportError(
            f"{path}: a DICOM SEG of {mask.shape[2]} frames needs patient geometry (ImagePositionPatient and "
            f"ImageOrientationPatient) to place them, and {scan.ref.path} has none; "
            "only other mask formats can be written"
        )
    numbers = np.zeros(mask.shape, dtype=np.uint16)
    for number, (_, value) in enumerate(segments, start=1):
        numbers[mask == value] = number
    frames = np.ascontiguousarray(np.transpose(numbers, (2, 1, 0)))  # (slice, row, column), spatial order
    if scan.metadata.get("frame_order"):  # one multi-frame source: back to its own frame order
        restored = np.zeros_like(frames)
        restored[[f - 1 for f in scan.metadata["frame_order"]]] = frames
        frames = restored
    seg = _build(sources, frames, segments, scan, path, algorithm, coding)
    with atomic_path(path) as tmp:
        try:
            seg.save_as(tmp, enforce_file_format=True)
        except _LIBRARY_ERRORS as exc:
            raise ExportError(f"{path}: pydicom could not encode the DICOM SEG ({type(exc).__name__}: {exc})") from exc
        _check_seg(tmp, numbers, scan, path)
    return path


def _build(
    sources: list[Dataset],
    frames: np.ndarray,
    segments: list[tuple[str, int]],
    scan: Scan,
    path: Path,
    algorithm: str,
    coding: Mapping[str, Any] | None,
) -> Any:
    import highdicom as hd
    import pydicom

    try:
        descriptions = segment_descriptions([name for name, _ in segments], algorithm, coding)
    except (ValueError, TypeError) as exc:
        raise ExportError(
            f"{path}: {exc}; fix data.classes_coding in the config (value, scheme and meaning per code)"
        ) from exc
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=pydicom.uid.generate_uid(),
            series_number=series_number_of(scan.metadata.get("series_number")),
            sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=dicom_text(algorithm) or "medseg",
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description(
                [name for name, _ in segments], scan.metadata.get("series_description", "")
            ),
            content_label="MEDSEG",
            content_description=dicom_text(f"medseg {algorithm} automatic segmentation"),
            omit_empty_frames=False,
        )
    except _LIBRARY_ERRORS as exc:
        raise ExportError(f"{path}: highdicom cannot build a DICOM SEG for {scan.ref.path}: {exc}") from exc
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # No plane position/orientation, so the General Image module needs PatientOrientation (Type 2C):
        # the source's, when it is a well-formed pair of directions, else empty as Type 2 allows.
        seg.PatientOrientation = _patient_orientation(sources[0])
    return seg


def _patient_orientation(ds: Dataset) -> list[str] | str:
    try:
        value = ds.get("PatientOrientation")
    except (ValueError, TypeError):
        return ""
    values = [str(v).strip().upper() for v in ([value] if isinstance(value, str) else list(value or []))]
    if len(values) == 2 and all(re.fullmatch(r"[ALPRHF]{1,3}", v) for v in values):
        return values
    return ""


def checked_mask(
    mask: np.ndarray, scan: Scan, path: Path, classes: Mapping[str, int], what: str, item: str
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The mask on the scan's grid and its (name, value) classes other than background, for a DICOM object.

    Shared by the SEG and RTSTRUCT writers: both need a DICOM source volume, at least one
    class to write as a ``item``, and no mask value that no class names. ExportError naming ``path``.
    """
    from medseg.export import spatial_mask  # medseg.export imports this module: resolve at call time

    mask = spatial_mask(mask, scan, path)
    if scan.ref.kind != "dicom" or mask.ndim != 3:
        raise ExportError(
            f"{path}: {what} needs a DICOM source series, and {scan.ref.path} is {scan.ref.kind}; "
            "write NIfTI or TIFF masks for it instead"
        )
    named = [(str(name), int(value)) for name, value in classes.items() if int(value) != 0]
    if not named:
        raise ExportError(
            f"{path}: no class other than background (label value 0) to write as a {item}; "
            f"check the checkpoint's classes {dict(classes)}"
        )
    known = {value for _, value in named} | {0}
    stray = sorted(int(v) for v in np.unique(mask) if int(v) not in known)
    if stray:
        raise ExportError(
            f"{path}: mask holds label values {stray[:10]} that no class names ({dict(classes)}); "
            "the mask and the class list do not belong together"
        )
    return mask, named


def series_number_of(value: Any) -> int:
    """The source's SeriesNumber (untrusted text) plus the offset, inside the IS range."""
    try:
        number = int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        number = 0
    return int(min(max(number, 0) + SERIES_NUMBER_OFFSET, _IS_MAX))


def series_description(names: Sequence[str], source: str) -> str:
    """'medseg: liver, kidney on <source SeriesDescription>', at most 64 characters (LO).

    A PACS lists series by this line; it says what was segmented and from which series
    even where the viewer does not resolve the referenced series.
    """
    what = ", ".join(dicom_text(n) for n in names)
    source = dicom_text(source)
    return dicom_text(f"medseg: {what} on {source}" if source else f"medseg: {what}")


def segment_descriptions(names: Sequence[str], algorithm: str, coding: Mapping[str, Any] | None = None) -> list[Any]:
    """One highdicom SegmentDescription per class name, numbered from 1, coded and coloured.

    The algorithm (name, version, family Artificial Intelligence, CID 7162) goes into each
    segment's AlgorithmIdentificationSequence, as the SEG IOD requires for AUTOMATIC segments.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.export import CLASS_COLOURS
    from medseg.export.seg_coding import segment_coding

    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=dicom_text(algorithm) or "medseg", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = []
    for number, name in enumerate(names, start=1):
        coded = segment_coding(name, coding)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=dicom_text(coded.label) or f"segment {number}",
            segmented_property_category=coded.category,
            segmented_property_type=coded.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            display_color=hd.color.CIELabColor.from_rgb(*CLASS_COLOURS[(number - 1) % len(CLASS_COLOURS)]),
        )
        if coded.modifier is not None:  # e.g. laterality: Kidney + Left (PS3.3 C.8.20.2, Table 10-7)
            modifier = hd.sr.CodedConcept(
                coded.modifier.value, coded.modifier.scheme_designator, coded.modifier.meaning
            )
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def source_datasets(scan: Scan, shown: Path | None = None) -> list[Dataset]:
    """The source headers in the scan's slice order, identifiers filled in (see `sources_and_placement`)."""
    return sources_and_placement(scan, shown)[0]


def sources_and_placement(scan: Scan, shown: Path | None = None) -> tuple[list[Dataset], bool]:
    """The source headers in the scan's slice order, with the identifiers the loader generated filled in.

    The files are planned again (headers only) to get the slice order the loader used;
    each header's SOP Instance UID must then be the loader's, or was one the loader
    generated, else the series changed on disk since it was read. Missing Type 2
    patient/study attributes are added empty; a blank FrameOfReferenceUID the loader had
    no reason to generate is removed rather than written blank (Type 1 may not be empty).
    Also returns whether the series has patient geometry (image position and orientation).
    """
    from medseg.errors import ScanError
    from medseg.ingest.dicom_headers import PATIENT_STUDY_ATTRIBUTES, read_dataset
    from medseg.ingest.dicom_series import plan_series
    from medseg.ingest.dicom_uids import valid_uid

    where = shown or scan.ref.path
    paths = list(scan.ref.paths)
    try:
        headers = {p: read_dataset(p, pixels=False) for p in paths}
        plan = plan_series(paths, headers)
    except ScanError as exc:
        raise ExportError(f"{where}: the source series can no longer be read for the DICOM SEG ({exc})") from exc
    meta = scan.metadata
    uids = [str(u) for u in meta.get("sop_instance_uids") or []]
    ordered = [headers[p] for p in plan.paths]
    if len(ordered) != len(uids):
        raise ExportError(
            f"{where}: the source series has {len(ordered)} files but was loaded with {len(uids)}; "
            "it changed on disk since it was read, so load it again"
        )
    generated = set((meta.get("generated_uids") or {}).get("SOPInstanceUID") or [])
    series_values = {
        "StudyInstanceUID": str(meta.get("study_instance_uid") or ""),
        "SeriesInstanceUID": str(meta.get("series_instance_uid") or ""),
        "FrameOfReferenceUID": str(meta.get("frame_of_reference_uid") or ""),
        "SOPClassUID": str(meta.get("sop_class_uid") or ""),
    }
    for path, ds, uid in zip(plan.paths, ordered, uids):
        own = _uid_text(ds, "SOPInstanceUID")
        if own != uid and uid not in generated:
            raise ExportError(
                f"{where}: {path.name} has SOPInstanceUID {own or '(blank)'} but was loaded as {uid}; "
                "the series changed on disk since it was read, so load it again"
            )
        ds.SOPInstanceUID = uid
        for name, value in series_values.items():
            if valid_uid(_uid_text(ds, name)):
                continue
            if value:
                setattr(ds, name, value)
            elif name in ds:
                del ds[name]
        for name in meta.get("malformed_attributes") or []:
            if name in ds:
                del ds[name]
        for name in PATIENT_STUDY_ATTRIBUTES:
            if name not in ds:
                setattr(ds, name, "")
    return ordered, plan.has_geometry


def _uid_text(ds: Dataset, name: str) -> str:
    try:
        value = ds.get(name)
    except (ValueError, TypeError, OverflowError):
        return ""
    return "" if value is None else str(value).strip()


def _check_seg(path: Path, numbers: np.ndarray, scan: Scan, shown: Path) -> None:
    """Read the written SEG back (highdicom) and compare references and pixels with what was meant."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        if str(seg.get("FrameOfReferenceUID", "") or "") != str(scan.metadata.get("frame_of_reference_uid") or ""):
            raise ExportError(f"{shown}: DICOM SEG frame of reference differs from the source series")
        if scan.metadata.get("frame_order"):
            source_uid = scan.metadata["sop_instance_uids"][0]
            pixels = seg.get_pixels_by_source_frame(
                source_uid, list(scan.metadata["frame_order"]), combine_segments=True
            )
        else:
            pixels = seg.get_pixels_by_source_instance(list(scan.metadata["sop_instance_uids"]), combine_segments=True)
    except _LIBRARY_ERRORS as exc:
        raise ExportError(
            f"{shown}: the DICOM SEG just written does not read back ({type(exc).__name__}: {exc})"
        ) from exc
    expected = np.transpose(numbers, (2, 1, 0))
    if pixels.shape != expected.shape or not np.array_equal(pixels, expected):
        raise ExportError(f"{shown}: DICOM SEG read back with shape {pixels.shape} or segments differing from the mask")
