"""Reading DICOM headers as untrusted input: typed tag access whose errors name the file and the tag.

Which objects hold no image, how long pixel data must be for the declared size, and the
tolerances every series check uses live here, so the series planner and the loader agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
)

from medseg.errors import ScanError
from medseg.geometry import check_values
from medseg.ingest.scan import LoadOptions

__all__ = [
    "NON_IMAGE_MODALITIES",
    "ORIENTATION_TOLERANCE",
    "PATIENT_STUDY_ATTRIBUTES",
    "SPACING_TOLERANCE",
    "THICKNESS_TOLERANCE_MM",
    "TILT_TOLERANCE",
    "channels_of",
    "check_pixel_length",
    "float_value",
    "float_values",
    "int_tag",
    "is_blank",
    "non_image_reason",
    "photometric",
    "read_dataset",
    "read_header",
    "required_tag",
    "text_tag",
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


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    """Read one DICOM file, with or without preamble; ScanError if it is not DICOM."""
    return _read(path, pixels)[0]


def read_header(path: Path) -> tuple[Dataset, int | None]:
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
            deflated = (
                text_tag(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            )
            offset = None if pixels or deflated else fp.tell()
    except ScanError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ScanError(
            path, f"unreadable DICOM file ({exc})", "the file is probably truncated or corrupt; re-export it"
        ) from exc
    if pixels and non_image_reason(ds) is None:
        check_pixel_length(path, ds)
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


def check_pixel_length(path: Path, ds: Dataset) -> None:
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


def float_values(value: Any, n: int, path: Path, name: str) -> np.ndarray:
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


def required_tag(ds: Dataset, name: str, path: Path) -> Any:
    """An attribute's value; pydicom converts on access, so a malformed value raises here."""
    try:
        return ds.get(name)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ScanError(path, f"{name} is malformed ({exc})", "the header is corrupt; re-export the file") from exc


def int_tag(ds: Dataset, name: str, path: Path, default: int | None = None) -> int:
    """An integer attribute, or ScanError naming it when it is missing or not a number."""
    value = required_tag(ds, name, path)
    if is_blank(value):
        if default is not None:
            return default
        raise ScanError(path, f"DICOM image has no {name}", "the header is incomplete; re-export the file")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ScanError(
            path, f"{name} is not an integer ({value!r})", "the header is corrupt; re-export the file"
        ) from exc


def float_value(value: Any, path: Path, name: str, default: float) -> float:
    if is_blank(value):
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ScanError(
            path, f"{name} is not a number ({value!r})", "the header is corrupt; re-export the file"
        ) from exc


def is_blank(value: Any) -> bool:
    return value is None or str(value).strip() == ""


def text_tag(ds: Dataset, name: str) -> str:
    try:
        value = ds.get(name)
    except (ValueError, TypeError, OverflowError):
        return ""
    return "" if value is None else str(value).strip()


def photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()


def channels_of(ds: Dataset, path: Path, options: LoadOptions = LoadOptions()) -> int:
    """Channels once decoded: palette indices become RGB, every other image keeps its samples."""
    if options.palette == "rgb" and photometric(ds) == "PALETTE COLOR":
        return 3
    return int_tag(ds, "SamplesPerPixel", path, default=1)
