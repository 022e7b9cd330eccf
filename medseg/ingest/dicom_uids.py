"""The identifiers a series carries into exported DICOM objects (SEG, RTSTRUCT), blank ones filled.

Real anonymised exports blank or drop UIDs; a derived object still needs valid ones, so
missing instance UIDs are derived from each file's content (the same on every read) and
everything filled is reported.
"""

from __future__ import annotations

import re

import hashlib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import validate_value

from pydicom.uid import (
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
)

from medseg.ingest.dicom_headers import PATIENT_STUDY_ATTRIBUTES, text_tag
from medseg.ingest.dicom_series import DicomSeries

__all__ = ["source_identifiers", "valid_uid"]


def valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID by PS3.5 9.1 (dot-separated numbers, no leading zeros, at most 64 characters)."""
    return len(value) <= 64 and _UID_SYNTAX.fullmatch(value) is not None


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
        name: text_tag(first, name)
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
    stored = text_tag(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if valid_uid(stored):
        return stored, "taken from the file meta information (MediaStorageSOPClassUID)"
    modality = text_tag(ds, "Modality").upper()
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
        if text_tag(ds, "SamplesPerPixel") == "3":
            return (
                MultiFrameTrueColorSecondaryCaptureImageStorage,
                "assumed: a multi-frame colour image of no known modality",
            )
        if text_tag(ds, "BitsAllocated") == "8":
            return (
                MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                "assumed: a multi-frame 8-bit image of no known modality",
            )
        return MultiFrameGrayscaleWordSecondaryCaptureImageStorage, "assumed: a multi-frame image of no known modality"
    return SecondaryCaptureImageStorage, "assumed: the header matches no modality-specific image IOD"


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
