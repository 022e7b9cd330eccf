"""RTSTRUCT export: contours in the series' world coordinates that rasterise back onto the mask.

Each file written here is read back twice: by medseg.export.rtstruct.read_rtstruct (which the
writer also runs on its own output) and by an independent reader in this file that takes
the contour points into voxel space through the phantom's own affine (the truth, not the
loader's geometry) and fills them with matplotlib's point-in-polygon test. It must also
pass dciodvfy (dicom3tools) without errors; without dciodvfy the read-back checks still
run and the test then skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pydicom
import pytest
import torch
from matplotlib.path import Path as Polygon

from medseg.data import phantoms
from medseg.export import CLASS_COLOURS, ExportError, export_mask
from medseg.geometry import LPS_TO_RAS
from medseg.ingest import discover, load, ref_for_path
from medseg.ingest.dicom_series import plan_series
from medseg.export.rtstruct import read_rtstruct, write_rtstruct

from conftest import dciodvfy, enhanced_multiframe

CT_CLASSES = phantoms.CT_CLASSES  # background 0, liver 1, kidney 2, spine 3
OBLIQUE = (18.0, -12.0, 25.0)
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_WARNING = "Warning - Missing attribute or value that would be needed to build DICOMDIR"


def _series(tmp_path: Path, name: str, oblique=None, edit=None, shape=(40, 36, 24), order="sequential"):
    """A CT phantom written as a DICOM series (each file edited by ``edit(ds)``), and the loaded scan.

    ``order`` "shuffled" names the files and numbers the instances against their positions.
    """
    truth = phantoms.ct_phantom(shape=shape, oblique=oblique)
    folder = tmp_path / "in" / name
    paths = phantoms.write_dicom_series(truth, folder, series_description=f"rt {name}", order=order)
    for path in paths:
        if edit is not None:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path)
    found = discover(folder)
    assert not found.problems and len(found.scans) == 1, found
    return truth, load(found.scans[0])


def _blank_everything(ds) -> None:
    for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, "")
    ds.file_meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPInstanceUID = ""
    del ds.FrameOfReferenceUID
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        delattr(ds, keyword)


def _independent_masks(path: Path, affine: np.ndarray, shape, scan) -> dict[str, np.ndarray]:
    """ROI name → mask from the file's contours, placed through ``affine`` (voxel → RAS) with matplotlib.

    Contours on one plane combine by the even-odd rule; each contour must lie on one image
    plane and reference the file whose own ImagePositionPatient lies on that plane.
    """
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    to_voxel = np.linalg.inv(np.linalg.inv(LPS_TO_RAS) @ affine)
    slice_of = {}  # SOP Instance UID (the loader's, generated where blank) → slice of the file's own position
    files = plan_series(list(scan.ref.paths)).paths  # the loader's slice order, which its UIDs follow
    for uid, file in zip(scan.metadata["sop_instance_uids"], files):
        position = np.asarray(pydicom.dcmread(file, stop_before_pixels=True).ImagePositionPatient, dtype=float)
        slice_of[uid] = int(round((to_voxel @ np.append(position, 1.0))[2]))
    centres = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1).reshape(-1, 2)
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            voxels = (np.column_stack([points, np.ones(len(points))]) @ to_voxel.T)[:, :3]
            k = int(round(voxels[0, 2]))
            assert np.allclose(voxels[:, 2], k, atol=1e-3), "contour off the image planes"
            assert slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID] == k
            inside = Polygon(voxels[:, :2]).contains_points(centres).reshape(shape[:2])
            mask[:, :, k] ^= inside
        masks[names[int(roi.ReferencedROINumber)]] = mask
    return masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# --- phantoms: axis-aligned and oblique ----------------------------------------------------------


@pytest.mark.parametrize(
    ("oblique", "order"), [(None, "sequential"), (OBLIQUE, "shuffled")], ids=["axis-aligned", "oblique-shuffled"]
)
def test_phantom_contours_overlay_the_mask_in_world_coordinates(tmp_path, oblique, order):
    truth, scan = _series(tmp_path, "ct", oblique, order=order)
    assert np.allclose(scan.geometry.affine, truth.affine, atol=1e-5)  # the phantom's grid is the scan's
    out = tmp_path / "out" / "ct.rtstruct.dcm"
    assert write_rtstruct(truth.label, scan, out, CT_CLASSES) == out

    by_medseg = read_rtstruct(out, scan)
    by_matplotlib = _independent_masks(out, truth.affine, truth.label.shape, scan)
    for name, value in CT_CLASSES.items():
        if value == 0:
            continue
        expected = truth.label == value
        assert np.array_equal(by_medseg[name], expected), name
        assert _dice(by_matplotlib[name], expected) >= 0.95, name

    ds = pydicom.dcmread(out)
    meta = scan.metadata
    assert (ds.SOPClassUID, ds.Modality) == (RT_STRUCTURE_SET, "RTSTRUCT")
    assert ds.StudyInstanceUID == meta["study_instance_uid"]
    assert ds.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    assert ds.SeriesInstanceUID != meta["series_instance_uid"]
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == meta["series_instance_uid"]
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == meta["sop_instance_uids"]
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "kidney", "spine"]
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert [tuple(int(c) for c in r.ROIDisplayColor) for r in ds.ROIContourSequence] == CLASS_COLOURS[:3]
    liver = ds.RTROIObservationsSequence[0]
    assert liver.RTROIIdentificationCodeSequence[0].CodeValue == "10200004"  # SNOMED CT Liver, as in the SEG
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert liver.RTROIInterpretedType == "ORGAN"
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert dciodvfy(out) == []


def test_blank_uids_are_referenced_as_the_dicom_seg_references_them(tmp_path):
    truth, scan = _series(tmp_path, "blank", OBLIQUE, _blank_everything)
    meta = scan.metadata
    generated = {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"}
    assert set(meta["generated_uids"]) >= generated
    out = tmp_path / "out"
    written = export_mask(truth.label, scan, out, CT_CLASSES, formats=["dicom-seg", "rtstruct"])
    assert [p.name for p in written] == ["blank.seg.dcm", "blank.rtstruct.dcm"]
    seg, rt = (pydicom.dcmread(p) for p in written)
    assert rt.StudyInstanceUID == seg.StudyInstanceUID == meta["study_instance_uid"]
    assert rt.FrameOfReferenceUID == seg.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    seg_items = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    seg_instances = sorted(i.ReferencedSOPInstanceUID for i in seg_items)
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_instance_uid"]
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == seg_instances
    assert {i.ReferencedSOPClassUID for i in series.ContourImageSequence} == {pydicom.uid.CTImageStorage}
    masks = _independent_masks(written[1], truth.affine, truth.label.shape, scan)
    for name, value in CT_CLASSES.items():
        if value:
            assert _dice(masks[name], truth.label == value) >= 0.95, name
    warnings = dciodvfy(written[1])
    assert warnings and all(w.startswith(DICOMDIR_WARNING) for w in warnings), warnings  # Type 2, empty as allowed


def test_an_empty_class_is_listed_without_contours(tmp_path):
    truth, scan = _series(tmp_path, "nokidney")
    mask = np.where(truth.label == 2, 0, truth.label).astype(np.uint8)
    out = write_rtstruct(mask, scan, tmp_path / "out" / "x.rtstruct.dcm", CT_CLASSES)
    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "kidney", "spine"]
    kidney = ds.ROIContourSequence[1]
    assert int(kidney.ReferencedROINumber) == 2 and "ContourSequence" not in kidney
    assert len(ds.ROIContourSequence[0].ContourSequence) > 0
    back = read_rtstruct(out, scan)
    assert not back["kidney"].any() and np.array_equal(back["liver"], mask == 1)
    assert dciodvfy(out) == []


def test_holes_islands_and_diagonal_pixels_round_trip_exactly(tmp_path):
    """Random labels: every saddle, hole and island in a hole; nested contours are read by the even-odd rule."""
    truth, scan = _series(tmp_path, "noise", OBLIQUE, shape=(24, 20, 3))
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=truth.label.shape).astype(np.uint8)
    ring = np.zeros(truth.label.shape[:2], bool)  # a ring with an island in its hole, on slice 0
    ring[4:16, 4:16] = True
    ring[7:13, 7:13] = False
    ring[9:11, 9:11] = True
    mask[:, :, 0] = np.where(ring, 1, 0)
    out = write_rtstruct(mask, scan, tmp_path / "out" / "noise.rtstruct.dcm", CT_CLASSES)
    back = read_rtstruct(out, scan)
    for name, value in CT_CLASSES.items():
        if value:
            assert np.array_equal(back[name], mask == value), name
    ds = pydicom.dcmread(out)
    on_first = [
        c
        for c in ds.ROIContourSequence[0].ContourSequence
        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == scan.metadata["sop_instance_uids"][0]
    ]
    assert len(on_first) == 3  # outer edge, hole, island
    assert _dice(_independent_masks(out, truth.affine, mask.shape, scan)["liver"], mask == 1) >= 0.95
    assert dciodvfy(out) == []


def test_enhanced_multiframe_source_is_referenced_frame_by_frame(tmp_path):
    truth = phantoms.ct_phantom(shape=(40, 36, 6), oblique=(10.0, 5.0, -20.0), seed=6)
    paths = phantoms.write_dicom_series(truth, tmp_path / "single")
    path = enhanced_multiframe(paths, tmp_path / "mf" / "enhanced.dcm")
    scan = load(ref_for_path(path))
    assert len(scan.metadata["frame_order"]) == 6
    out = write_rtstruct(truth.label, scan, tmp_path / "out" / "mf.rtstruct.dcm", CT_CLASSES)
    back = read_rtstruct(out, scan)
    assert all(np.array_equal(back[n], truth.label == v) for n, v in CT_CLASSES.items() if v)
    ds = pydicom.dcmread(out)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        image = contour.ContourImageSequence[0]
        assert image.ReferencedSOPInstanceUID == scan.metadata["sop_instance_uids"][0]
        assert int(image.ReferencedFrameNumber) in scan.metadata["frame_order"]
    assert dciodvfy(out) == []


# --- what cannot become an RTSTRUCT is an ExportError naming the file ------------------------------


def test_a_non_dicom_input_is_refused_in_one_sentence(tmp_path):
    truth = phantoms.ct_phantom()
    scan = load(ref_for_path(phantoms.write_nifti(truth.image, truth.affine, tmp_path / "in" / "ct.nii.gz")))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="needs a DICOM source series") as info:
        export_mask(truth.label, scan, out, CT_CLASSES, formats=["rtstruct"])
    message = str(info.value)
    assert str(out / "ct.rtstruct.dcm") in message and "nifti" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence
    assert not (out / "ct.rtstruct.dcm").exists()


def test_a_series_without_patient_geometry_is_refused(tmp_path):
    def flat(ds):
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
            delattr(ds, keyword)

    truth, scan = _series(tmp_path, "flat", edit=flat, shape=(40, 36, 1))
    out = tmp_path / "out" / "flat.rtstruct.dcm"
    with pytest.raises(ExportError, match="no patient geometry") as info:
        write_rtstruct(truth.label, scan, out, CT_CLASSES)
    assert str(out) in str(info.value)
    assert not out.exists()


def test_mask_values_without_a_class_are_refused(tmp_path):
    truth, scan = _series(tmp_path, "stray", shape=(20, 18, 3))
    mask = truth.label.copy()
    mask[0, 0, 0] = 9
    with pytest.raises(ExportError, match=r"label values \[9\]"):
        write_rtstruct(mask, scan, tmp_path / "out" / "x.rtstruct.dcm", CT_CLASSES)


def test_a_file_whose_contours_do_not_read_back_is_not_kept(tmp_path, monkeypatch):
    """The writer's read-back is a real check: contours a pixel off are caught and nothing replaces the target."""
    import medseg.export.rtstruct as rtstruct

    truth, scan = _series(tmp_path, "shifted", shape=(30, 26, 4))
    trace = rtstruct._trace

    def shifted(binary, affine):
        moved = affine.copy()
        moved[:3, 3] += affine[:3, 0]  # one column over
        return trace(binary, moved)

    monkeypatch.setattr(rtstruct, "_trace", shifted)
    out = tmp_path / "out" / "x.rtstruct.dcm"
    with pytest.raises(ExportError, match="read back with .* voxels differing"):
        write_rtstruct(truth.label, scan, out, CT_CLASSES)
    assert not out.exists() and not list(out.parent.glob("*medseg-tmp*"))


def test_an_rtstruct_of_another_frame_of_reference_is_not_read_onto_this_scan(tmp_path):
    truth, scan = _series(tmp_path, "a", shape=(20, 18, 3))
    _, other = _series(tmp_path, "b", edit=lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"), shape=(20, 18, 3))
    out = write_rtstruct(truth.label, scan, tmp_path / "out" / "a.rtstruct.dcm", CT_CLASSES)
    with pytest.raises(ExportError, match="belongs to another series"):
        read_rtstruct(out, other)


# --- end to end: predict writes NIfTI and RTSTRUCT from one prediction ------------------------------


@pytest.fixture(scope="module")
def tiny_3d_checkpoint(tmp_path_factory) -> Path:
    """An untrained 3D U-Net for the CT classes: predicts something, fast; the export is what is tested."""
    from medseg.training.checkpoint import Checkpoint, save_checkpoint
    from medseg.config import config_from_dict
    from medseg.models import build_model

    torch.manual_seed(0)  # the same untrained weights, so the same prediction, on every run
    config = config_from_dict(
        {
            "data": {"classes": dict(CT_CLASSES)},
            "model": {"name": "unet", "spatial_dims": 3, "out_channels": 4, "features": 4, "depth": 2},
            "train": {"patch_size": [16, 16, 16]},
        }
    )
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(Checkpoint(config, build_model(config.model).state_dict()), path)
    return path


def test_segment_folder_writes_nifti_and_rtstruct_that_agree(tmp_path, tiny_3d_checkpoint):
    import nibabel as nib

    from medseg.inference.predictor import Predictor
    from medseg.pipeline import segment_folder

    truth, scan = _series(tmp_path, "case", OBLIQUE, _blank_everything)
    out = tmp_path / "out"
    report = segment_folder(
        Predictor(tiny_3d_checkpoint), tmp_path / "in", out, formats=["nifti", "rtstruct"], progress=False
    )
    assert report.counts() == {"written": 1, "skipped": 0, "failed": 0}, report.records
    assert sorted(Path(p).name for p in report.records[0].outputs) == ["case.nii.gz", "case.rtstruct.dcm"]
    nifti = np.asanyarray(nib.load(out / "case.nii.gz").dataobj)
    back = read_rtstruct(out / "case.rtstruct.dcm", scan)
    assert sorted(back) == ["kidney", "liver", "spine"]
    assert any(mask.any() for mask in back.values())  # the untrained model does predict structures
    for name, value in CT_CLASSES.items():
        if value:
            assert np.array_equal(back[name], nifti == value), name
    assert not list(out.rglob("*medseg-tmp*"))
    warnings = dciodvfy(out / "case.rtstruct.dcm")
    assert all(w.startswith(DICOMDIR_WARNING) for w in warnings), warnings


def test_rtstruct_is_a_format_of_predict_and_of_the_flow(tmp_path, tiny_3d_checkpoint, capsys):
    from medseg_flows import segment_study, settings
    from medseg.cli import main

    assert "rtstruct" in get_args(segment_study.MaskFormat) and "rtstruct" in get_args(settings.MaskFormat)
    _series(tmp_path, "cli", shape=(20, 18, 4))
    args = [
        "predict",
        "--checkpoint",
        str(tiny_3d_checkpoint),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--format",
        "rtstruct",
    ]
    assert main(args) == 0, capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").glob("*.dcm")] == ["cli.rtstruct.dcm"]


def test_the_flow_scores_the_nifti_mask_when_rtstruct_comes_first(tmp_path):
    """evaluate-scan scores the first mask that is not a DICOM object (SEG or RTSTRUCT)."""
    import medseg_flows  # noqa: F401  (Prefect defaults before Prefect)
    from medseg_flows import tasks
    from medseg.ingest import ref_for_path
    from medseg.pipeline import CaseRecord

    mask = np.zeros((6, 6, 3), np.uint8)
    mask[1:4, 2:5, 1] = 1
    phantoms.write_nifti(mask, np.eye(4), tmp_path / "out" / "ct.nii.gz")
    phantoms.write_nifti(mask, np.eye(4), tmp_path / "ref" / "ct.nii.gz")
    (tmp_path / "out" / "ct.rtstruct.dcm").write_bytes(b"not a mask")
    outputs = [str(tmp_path / "out" / name) for name in ("ct.rtstruct.dcm", "ct.seg.dcm", "ct.nii.gz")]
    record = CaseRecord("ct", "dicom", "in/ct", "written", outputs)
    scores = tasks.evaluate_scan.fn(record, ref_for_path(tmp_path / "ref" / "ct.nii.gz"), {"bg": 0, "fg": 1})
    assert scores["classes"]["fg"]["dice"] == 1.0
