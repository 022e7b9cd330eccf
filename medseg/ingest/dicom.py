"""DICOM series and multi-frame images → channel-first array + RAS affine.

The series is planned from headers (`dicom_series`), then its pixels are decoded slice by
slice inside the memory budget (`dicom_pixels`), rescaled and shown the way the file says
(photometric interpretation, palette, colour).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, pixel_array

from medseg.errors import ScanError
from medseg.ingest import dicom_pixels
from medseg.ingest.budget import check_budget, dicom_nbytes
from medseg.ingest.dicom_headers import (
    channels_of,
    photometric,
    text_tag,
    check_pixel_length,
    float_value,
    required_tag,
    int_tag,
    read_header,
    non_image_reason,
    read_dataset,
)
from medseg.ingest.dicom_pixels import preferred_plugin, read_volume
from medseg.ingest.dicom_series import first_item, header_notes, plan_series
from medseg.ingest.dicom_uids import source_identifiers
from medseg.ingest.scan import LoadOptions, Scan, ScanRef

__all__ = ["load_dicom"]


def _rescale(ds: Dataset, frame: Dataset | None, shared: Dataset | None, path: Path) -> tuple[float, float]:
    source = ds
    for group in (frame, shared):
        item = first_item(group, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item:
            source = item
            break
    slope = float_value(required_tag(source, "RescaleSlope", path), path, "RescaleSlope", 1.0)
    intercept = float_value(required_tag(source, "RescaleIntercept", path), path, "RescaleIntercept", 0.0)
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


def _as_displayed(path: Path, ds: Dataset, pixels: np.ndarray, options: LoadOptions) -> tuple[np.ndarray, str | None]:
    """Stored values in the sense a viewer shows them, so that every series means brighter by higher.

    A model trained on MONOCHROME2 images would see a MONOCHROME1 radiograph (CR, DX, MG)
    as a negative, and a PALETTE COLOR image as arbitrary indices. YBR is already RGB here:
    pydicom converts it when decoding. A mask (``palette="indices"``) keeps its stored
    values: they are class values, not brightness.
    """
    kind = photometric(ds) if options.palette == "rgb" else "MONOCHROME2"
    if kind == "MONOCHROME1":
        bits = int_tag(ds, "BitsStored", path, default=8 * pixels.dtype.itemsize)
        signed = int_tag(ds, "PixelRepresentation", path, default=0) == 1
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
                check_pixel_length(path, header)
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
    syntaxes = {text_tag(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID") for ds in datasets}
    return syntaxes.pop() if len(syntaxes) == 1 else None


def load_dicom(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """Load a DICOM series (or one multi-frame file) named by ``ref``."""
    read = {p: read_header(p) for p in ref.paths}
    headers = {p: ds for p, (ds, _) in read.items()}
    for path, ds in headers.items():
        reason = non_image_reason(ds)
        if reason:
            raise ScanError(path, reason, "point medseg at the image series, not at this object")
    plan = plan_series(list(ref.paths), headers)
    first = headers[plan.paths[0]]
    samples = channels_of(first, plan.paths[0], options)
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
        shared = first_item(ds, "SharedFunctionalGroupsSequence")
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
        + header_notes(plan, [headers[p] for p in plan.paths])
        + sorted(n for n in shown if n is not None)
        + color_notes
        + id_notes,
    )


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
