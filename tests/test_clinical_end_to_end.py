"""Issue #16 end to end: series with real-world quirks through `medseg predict` in every DICOM format, each
object validated (dciodvfy) and read back, then scored against a reference stored in another axis order."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from conftest import dciodvfy
from medseg.data import phantoms
from medseg.evaluation.evaluate import evaluate_folders
from medseg.inference.predictor import Predictor
from medseg.ingest import discover, load
from medseg.pipeline import segment_folder
from medseg.export.rtstruct import read_rtstruct


def _blank_identifiers(ds: pydicom.Dataset, spacing: float) -> None:
    """As anonymisers leave them: SOP class and every instance, series and study UID blank."""
    for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, "")
    ds.file_meta.MediaStorageSOPClassUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""


def _overlapping(ds: pydicom.Dataset, spacing: float) -> None:
    ds.SliceThickness = f"{spacing * 1.5:.3f}"


def _gapped(ds: pydicom.Dataset, spacing: float) -> None:
    ds.SliceThickness = f"{spacing * 0.6:.3f}"


QUIRKS = {
    # name: (edit of each file, series options, words the scan's notes must hold)
    "blank-identifiers": (_blank_identifiers, {}, ["SOPClassUID"]),
    "overlapping-slices": (_overlapping, {}, ["overlap by"]),
    "gapped-slices": (_gapped, {}, ["gaps between them"]),
    "jpeg2000": (None, {"transfer_syntax": "jpeg2000"}, ["pixels compressed: JPEG 2000"]),
    "oblique": (None, {"oblique": (18.0, -12.0, 25.0)}, ["oblique: axes"]),
}


def _write(tmp_path: Path, name: str) -> Path:
    edit, options, _ = QUIRKS[name]
    truth = phantoms.ct_phantom(shape=(40, 36, 10), oblique=options.get("oblique"), seed=5)
    folder = tmp_path / "in" / name
    syntax = options.get("transfer_syntax", "explicit")
    paths = phantoms.write_dicom_series(truth, folder, transfer_syntax=syntax, series_description=name)
    spacing = float(np.linalg.norm(truth.affine[:3, 2]))
    for path in paths:
        if edit is not None:
            ds = pydicom.dcmread(path)
            edit(ds, spacing)
            ds.save_as(path)
    return folder


def _other_axis_order(mask_path: Path, reference: Path) -> str:
    """The NIfTI mask stored with its axes permuted and flipped (same voxel centres), as another tool might."""
    image = nib.load(mask_path)
    data = np.asanyarray(image.dataobj)
    transform = np.array([[1, -1], [2, 1], [0, -1]])  # new axis k = old axis transform[k, 0], flipped if -1
    moved = np.transpose(data, transform[:, 0])
    for axis, (_, sign) in enumerate(transform):
        if sign < 0:
            moved = np.flip(moved, axis)
    affine = np.eye(4)
    for axis, (old, sign) in enumerate(transform):
        column = image.affine[:3, old] * sign
        affine[:3, axis] = column
    corner = [0 if sign > 0 else data.shape[old] - 1 for old, sign in transform]
    origin_index = np.zeros(3)
    for (old, _), value in zip(transform, corner):
        origin_index[old] = value
    affine[:3, 3] = image.affine[:3, :3] @ origin_index + image.affine[:3, 3]
    reference.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(moved), affine), reference)
    return "".join(nib.aff2axcodes(affine))


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_quirky_series_through_every_format_and_scored_in_another_axis_order(ct_model, tmp_path, quirk):
    folder = _write(tmp_path, quirk)
    out = tmp_path / "out"
    report = segment_folder(Predictor(ct_model), tmp_path / "in", out, ["nifti", "dicom-seg", "rtstruct"], False, False)
    assert report.counts() == {"written": 1, "skipped": 0, "failed": 0}, report.records
    record = report.records[0]
    notes = " | ".join(record.notes)
    assert all(word in notes for word in QUIRKS[quirk][2]), notes  # what the files said reaches predictions.json

    scan = load(discover(folder).scans[0])
    mask = np.asanyarray(nib.load(out / f"{quirk}.nii.gz").dataobj)
    classes = {name: value for name, value in phantoms.CT_CLASSES.items() if value}
    assert mask.any(), "the phantom's organs are found (a trained model)"

    seg_path = out / f"{quirk}.seg.dcm"
    dciodvfy(seg_path)
    seg = hd.seg.segread(seg_path)
    if quirk == "blank-identifiers":
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID == CTImageStorage
    frames = seg.get_pixels_by_source_instance(scan.metadata["sop_instance_uids"], combine_segments=True)
    numbers = np.zeros(mask.shape, np.uint16)
    for number, value in enumerate(classes.values(), start=1):
        numbers[mask == value] = number
    assert np.array_equal(frames, np.transpose(numbers, (2, 1, 0)))  # the SEG reads back to the NIfTI mask

    rt_path = out / f"{quirk}.rtstruct.dcm"
    dciodvfy(rt_path)
    rois = read_rtstruct(rt_path, scan)
    for name, value in classes.items():
        expected = mask == value
        got = rois[name]
        dice = 2 * np.logical_and(got, expected).sum() / max(got.sum() + expected.sum(), 1)
        assert dice >= 0.95 or not expected.any(), (name, dice)

    codes = _other_axis_order(out / f"{quirk}.nii.gz", tmp_path / "ref" / f"{quirk}.nii.gz")
    evaluation = evaluate_folders(out, tmp_path / "ref", classes=phantoms.CT_CLASSES, progress=False)
    (case,) = evaluation.cases
    assert case["grid"] == "reoriented" and codes in " ".join(case["notes"])
    for name, value in classes.items():
        if (mask == value).any():
            assert case["classes"][name]["dice"] == 1.0, name
