"""Prediction and export: masks overlay their scans in world space, in every format."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from PIL import Image

from medseg.data import phantoms
from medseg.files import JOURNAL_DIR, TMP_MARKER
from medseg.pipeline import OutputUnwritable, segment_folder
from medseg.training.checkpoint import load_checkpoint, save_checkpoint
from medseg.cli import main
from medseg.inference.predictor import Predictor
from medseg.ingest import discover, load
from medseg.training.loop import train

from conftest import snapshot, tiny_em_config, write_em_pairs

CT_CLASSES = {"background": 0, "liver": 1, "kidney": 2, "spine": 3}


@pytest.fixture(scope="module")
def em_model(tmp_path_factory) -> Path:
    """A tiny 2D U-Net trained briefly on EM phantom slices."""
    root = tmp_path_factory.mktemp("em")
    write_em_pairs(root, slices=6)
    return train(tiny_em_config(root, root / "runs", "em2d", epochs=3, steps_per_epoch=15), progress=False).run_dir


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _seg_world_points(seg_path: Path, segment: int) -> np.ndarray:
    """World (RAS mm) centres of the pixels of one segment, from the SEG's own plane geometry."""
    seg = hd.seg.segread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    points = []
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != segment:
            continue
        ipp = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(frames[i])
        lps = ipp + np.outer(cols * spacing[1], iop[:3]) + np.outer(rows * spacing[0], iop[3:])
        points.append(lps * np.array([-1, -1, 1]))
    return np.concatenate(points) if points else np.zeros((0, 3))


def test_oblique_dicom_masks_overlay_truth_in_world_space(ct_model, tmp_path):
    truth = phantoms.ct_phantom(shape=(40, 36, 20), oblique=(18.0, -12.0, 25.0), seed=11)
    phantoms.write_dicom_series(truth, tmp_path / "in" / "ct", order="shuffled", extension="")
    before = snapshot(tmp_path / "in")
    report = segment_folder(Predictor(ct_model), tmp_path / "in", tmp_path / "out", progress=False)
    assert report.counts() == {"written": 1, "skipped": 0, "failed": 0}, report.records
    assert snapshot(tmp_path / "in") == before

    nifti = nib.load(tmp_path / "out" / "ct.nii.gz")
    assert np.abs(nifti.affine - truth.affine).max() < 1e-4
    mask = np.asanyarray(nifti.dataobj)
    assert mask.shape == truth.label.shape
    # a briefly trained tiny model: the liver (the largest organ) and the union of organs overlay well
    assert _dice(mask == 1, truth.label == 1) > 0.7
    assert _dice(mask > 0, truth.label > 0) > 0.7

    # DICOM SEG: every labelled pixel, placed by the SEG's own geometry, lands on a voxel
    # centre of the truth grid, on exactly the voxels the NIfTI mask labels.
    inverse = np.linalg.inv(truth.affine)
    for number, value in enumerate((1, 2, 3), start=1):
        world = _seg_world_points(tmp_path / "out" / "ct.seg.dcm", number)
        if len(world) == 0:
            assert not (mask == value).any(), value
            continue
        index = (np.c_[world, np.ones(len(world))] @ inverse.T)[:, :3]
        assert np.abs(index - np.round(index)).max() < 1e-3
        from_seg = np.zeros(truth.label.shape, bool)
        idx = np.round(index).astype(int)
        from_seg[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        assert np.array_equal(from_seg, mask == value), value


def test_dicom_seg_round_trip(ct_model, tmp_path):
    truth = phantoms.ct_phantom(shape=(40, 36, 12), seed=5)
    paths = phantoms.write_dicom_series(truth, tmp_path / "in" / "ct", order="reversed")
    segment_folder(Predictor(ct_model), tmp_path / "in", tmp_path / "out", formats=["dicom-seg"], progress=False)
    seg = hd.seg.segread(tmp_path / "out" / "ct.seg.dcm")
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in source
    }
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers] == ["liver", "kidney", "spine"]
    assert int(seg.NumberOfFrames) == 3 * truth.image.shape[2]  # one frame per segment and slice
    scan = load(discover(tmp_path / "in").scans[0])
    pixels = seg.get_pixels_by_source_instance(scan.metadata["sop_instance_uids"], combine_segments=True)
    assert pixels.shape == (12, 36, 40)


def test_export_failure_leaves_no_partial_file(ct_model, tmp_path, monkeypatch):
    truth = phantoms.ct_phantom(shape=(32, 32, 8))
    phantoms.write_nifti(truth.image, truth.affine, tmp_path / "in" / "ct.nii.gz")
    before = snapshot(tmp_path / "in")
    real_save = nib.save

    def crash(img, filename):
        real_save(img, filename)  # the bytes hit the disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    report = segment_folder(Predictor(ct_model), tmp_path / "in", tmp_path / "out", progress=False)
    assert report.records[0].status == "failed" and "disk full" in report.records[0].reason
    leftovers = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert leftovers == [".medseg", "predictions.json", "review", "review.html"]  # reports, no mask debris
    assert [p.name for p in (tmp_path / "out" / ".medseg").iterdir()] == ["review-files.json"]  # no journal left
    assert not list((tmp_path / "out").rglob(f"*{TMP_MARKER}*")) and not (tmp_path / "out" / JOURNAL_DIR).exists()
    assert snapshot(tmp_path / "in") == before


def test_output_inside_input_is_refused(ct_model, tmp_path):
    truth = phantoms.ct_phantom(shape=(32, 32, 8))
    phantoms.write_nifti(truth.image, truth.affine, tmp_path / "in" / "ct.nii.gz")
    before = snapshot(tmp_path / "in")
    for output in (tmp_path / "in" / "masks", tmp_path / "in", tmp_path):  # nested, equal, holding the input
        with pytest.raises(OutputUnwritable, match="overlap"):
            segment_folder(Predictor(ct_model), tmp_path / "in", output, progress=False)
        assert snapshot(tmp_path / "in") == before
    assert not (tmp_path / "in" / "masks").exists() and not (tmp_path / "predictions.json").exists()


def test_skip_if_done_and_overwrite(em_model, tmp_path, capsys):
    em = phantoms.em_phantom(shape=(64, 48, 3), seed=9)
    phantoms.write_tiff_stack(em.image, em.affine, tmp_path / "in" / "stack.tif")
    args = [
        "predict",
        "--checkpoint",
        str(em_model),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    assert "1 written" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out
    future = time.time() + 5
    os.utime(tmp_path / "in" / "stack.tif", (future, future))  # touched, same bytes: content decides, not times
    assert main(args) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out
    mask_path = tmp_path / "out" / "stack.tif"
    whole = mask_path.read_bytes()
    for damaged in (whole[:100], whole[:-1] + bytes([whole[-1] ^ 1])):  # truncated by a full disk; edited in place
        mask_path.write_bytes(damaged)
        assert main(args) == 0
        assert "1 written, 0 skipped" in capsys.readouterr().out
        assert mask_path.read_bytes() == whole
    phantoms.write_tiff_stack(em.image[::-1].copy(), em.affine, tmp_path / "in" / "stack.tif")  # new content
    assert main(args) == 0
    assert "1 written" in capsys.readouterr().out
    assert main(args + ["--overwrite", "--precision", "fp32"]) == 0
    assert "1 written" in capsys.readouterr().out
    assert main(args + ["--overwrite", "--precision", "fp16"]) != 0  # no CUDA here
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert manifest["classes"] == {"membrane": 0, "cell": 255}
    mask = tifffile.TiffFile(tmp_path / "out" / "stack.tif")
    assert mask.series[0].shape == (3, 48, 64)
    back = load(discover(tmp_path / "out" / "stack.tif").scans[0])
    assert np.allclose(back.geometry.spacing, (4e-6, 4e-6, 5e-5))  # pixel size tags kept

    (tmp_path / "in" / "stack.tif").rename(tmp_path / "in" / "renamed.tif")  # its old mask is now an orphan
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "orphan stack: its input" in out and "stack.tif" in out and mask_path.read_bytes()  # listed, kept
    manifest = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [o["case"] for o in manifest["orphans"]] == ["stack"] and manifest["orphans"][0]["outputs"] == ["stack.tif"]


def test_2d_model_on_png_sequence_writes_stack_and_slices(em_model, tmp_path):
    em = phantoms.em_phantom(shape=(64, 64, 4), cells=12, seed=4)
    phantoms.write_png_sequence(em.image, tmp_path / "in" / "test")
    report = segment_folder(Predictor(em_model, tta=True), tmp_path / "in", tmp_path / "out", progress=False)
    assert report.counts()["written"] == 1, report.records
    stack = tifffile.imread(tmp_path / "out" / "test.tif")
    assert stack.shape == (4, 64, 64)
    slices = sorted((tmp_path / "out" / "test").iterdir())
    assert [p.name for p in slices] == ["0.png", "1.png", "2.png", "3.png"]
    assert np.array_equal(np.asarray(Image.open(slices[2])), stack[2])
    assert set(np.unique(stack)) <= {0, 255}
    assert _dice(stack.transpose(2, 1, 0) == 0, em.label == 0) > 0.6


def test_mirroring_tta_on_a_model_trained_without_mirroring_warns(em_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medseg.inference.predictor"):
        Predictor(em_model, tta=False)
        assert not caplog.records
        Predictor(em_model, tta=True)  # trained with augmentation off
    assert "never saw a mirrored sample" in caplog.text and str(em_model) in caplog.text
    state = load_checkpoint(em_model / "best.pt")
    for p_flip, warns in ((0.0, True), (0.5, False)):  # augmented as the EM configs (no mirroring), or mirrored
        state.config.augment.enabled, state.config.augment.p_flip = True, p_flip
        save_checkpoint(state, tmp_path / "model.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medseg.inference.predictor"):
            Predictor(tmp_path / "model.pt", tta=True)
        assert bool(caplog.records) == warns


def test_tta_mirrors_only_the_axes_training_mirrored_along(em_model, tmp_path, monkeypatch):
    """The axes nnU-Net mirrors: a model trained mirrored along y only is tested mirrored along
    y only (2 passes, not 4); one never mirrored is mirrored along every axis, as asked. Each
    mirroring is applied to the input and undone on the probabilities: two flips per pass."""
    state = load_checkpoint(em_model / "best.pt")
    scan = load(discover(_em_image(tmp_path)).scans[0])
    seen: list[tuple[int, ...]] = []
    real_flip = torch.flip
    monkeypatch.setattr(torch, "flip", lambda x, dims: seen.append(tuple(dims)) or real_flip(x, dims))
    every = Counter({(2,): 2, (3,): 2, (2, 3): 2})
    for augment, axes, flips in (
        ({"enabled": True, "p_flip": 0.5, "flip_axes": [1]}, (1,), Counter({(3,): 2})),
        ({"enabled": True, "p_flip": 0.5, "flip_axes": None}, (0, 1), every),
        ({"enabled": False}, (0, 1), every),
    ):
        for key, value in augment.items():
            setattr(state.config.augment, key, value)
        save_checkpoint(state, tmp_path / "model.pt")
        predictor = Predictor(tmp_path / "model.pt", tta=True)
        assert predictor.tta_axes == axes
        seen.clear()
        mirrored = predictor.predict(scan).mask
        assert Counter(seen) == flips
    monkeypatch.undo()
    plain = Predictor(tmp_path / "model.pt", tta=False).predict(scan).mask
    assert mirrored.shape == plain.shape and np.mean(mirrored == plain) > 0.9


def _em_image(tmp_path: Path) -> Path:
    em = phantoms.em_phantom(shape=(64, 64, 1), seed=5)
    folder = tmp_path / "tta_scan"
    folder.mkdir(exist_ok=True)
    Image.fromarray(em.image[:, :, 0].T).save(folder / "slice.png")
    return folder


def test_corrupt_scan_fails_alone(em_model, tmp_path):
    em = phantoms.em_phantom(shape=(64, 64, 1), seed=4)
    Image.fromarray(em.image[:, :, 0].T).save(tmp_path / "good.png")
    (tmp_path / "in").mkdir()
    Image.fromarray(em.image[:, :, 0].T).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = segment_folder(Predictor(em_model), tmp_path / "in", tmp_path / "out", progress=False)
    status = {r.case: r.status for r in report.records}
    assert status == {"good": "written", "bad": "failed"}
    assert (tmp_path / "out" / "good.png").is_file()


def test_empty_input_folder_is_an_error(em_model, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no scans here")
    args = [
        "predict",
        "--checkpoint",
        str(em_model),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(args) == 1
    assert "holds no scan medseg can read" in capsys.readouterr().err
