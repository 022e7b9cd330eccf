"""`medseg evaluate`: scores against hand-computed values, empty-class conventions, the folder command."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import snapshot
from medseg.data import phantoms
from medseg.cli import main
from medseg.errors import ConfigError, LabelError, ScanError
from medseg.evaluation.evaluate import EvaluationReport, evaluate_case, evaluate_folders, parse_classes
from medseg.evaluation.reports import write_reports
from medseg.geometry import Geometry
from medseg.ingest import Scan, ScanRef
from medseg.evaluation.metrics import summarize

nan = float("nan")


def scan(array, spacing=None, case="case", known=True) -> Scan:
    """An in-memory mask on an axis-aligned grid."""
    array = np.asarray(array)
    geometry = Geometry.from_spacing(array.shape, spacing or (1.0,) * array.ndim, spacing_known=known)
    return Scan(ScanRef(case, "nifti", (Path(f"/masks/{case}.nii.gz"),)), array[None], geometry, "SEG")


def save_nifti(path: Path, array, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), np.eye(4) if affine is None else affine), str(path))


def save_png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- scores on small arrays ------------------------------------------------------------

REF_2D = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]
PRED_2D = [[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 0, 0], [0, 0, 0, 0]]


def test_dice_iou_pixel_accuracy_2d_by_hand():
    result = evaluate_case(scan(PRED_2D), scan(REF_2D), {"background": 0, "liver": 1, "kidney": 2})
    scores = result["classes"]
    # background: 8 ref, 10 pred, 7 shared; liver: 4 ref, 5 pred, 4 shared; kidney: 4 ref, 1 pred, 1 shared
    assert scores["background"]["dice"] == pytest.approx(14 / 18)
    assert scores["background"]["iou"] == pytest.approx(7 / 11)
    assert scores["liver"]["dice"] == pytest.approx(8 / 9)
    assert scores["liver"]["iou"] == pytest.approx(4 / 5)
    assert scores["kidney"]["dice"] == pytest.approx(2 / 5)
    assert scores["kidney"]["iou"] == pytest.approx(1 / 4)
    assert result["pixel_accuracy"] == pytest.approx(12 / 16)
    assert list(scores) == ["background", "liver", "kidney"]


def test_3d_multiclass_both_empty_is_nan_one_empty_is_zero():
    ref = np.zeros((3, 3, 3), np.uint8)
    ref[:2, :2, :2] = 1  # 8 voxels
    pred = np.zeros_like(ref)
    pred[:2, :2, :1] = 1  # 4 of them
    pred[2, 2, 2] = 1  # one false positive
    pred[2, 0, 2] = 3  # a class the reference lacks
    result = evaluate_case(scan(pred), scan(ref), {"bg": 0, "one": 1, "two": 2, "three": 3})
    scores = result["classes"]
    assert scores["one"]["dice"] == pytest.approx(8 / 13)
    assert scores["one"]["iou"] == pytest.approx(4 / 9)
    assert math.isnan(scores["two"]["dice"]) and math.isnan(scores["two"]["iou"])
    assert scores["three"]["dice"] == 0.0 and scores["three"]["iou"] == 0.0
    assert result["pixel_accuracy"] == pytest.approx(21 / 27)


def test_classes_default_to_values_found_and_stray_values_are_noted():
    result = evaluate_case(scan([[0, 255], [0, 0]]), scan([[0, 255], [255, 0]]))
    assert list(result["classes"]) == ["label_0", "label_255"]
    assert result["classes"]["label_255"]["dice"] == pytest.approx(2 / 3)
    noted = evaluate_case(scan([[0, 7], [0, 0]]), scan([[0, 1], [0, 0]]), {"bg": 0, "fg": 1})
    assert "[7]" in noted["notes"][0]


def test_both_empty_class_is_left_out_of_the_summary():
    classes = {"bg": 0, "fg": 1}
    present = evaluate_case(scan([[1, 1], [0, 0]]), scan([[1, 0], [0, 0]]), classes)  # fg dice 2/3
    absent = evaluate_case(scan([[0, 0], [0, 0]]), scan([[0, 0], [0, 0]]), classes)  # fg NaN
    missed = evaluate_case(scan([[0, 0], [0, 0]]), scan([[0, 1], [0, 0]]), classes)  # fg 0
    report = EvaluationReport(Path("p"), Path("r"), classes, "given", ("dice", "iou"), cases=[present, absent])
    assert report.summary["classes"]["fg"]["dice"] == {
        "mean": pytest.approx(2 / 3),
        "std": 0.0,
        "median": pytest.approx(2 / 3),
        "n": 1,
    }
    report.cases.append(missed)
    stats = report.summary["classes"]["fg"]["dice"]
    assert stats["mean"] == pytest.approx(1 / 3) and stats["n"] == 2
    assert stats["std"] == pytest.approx(1 / 3)  # population std of {2/3, 0}
    assert report.summary["pixel_accuracy"]["n"] == 3


# -- distances ---------------------------------------------------------------------------

SPACING = (2.0, 1.0, 0.5)


@pytest.mark.parametrize(
    "axis, tolerance, hd95, nsd",
    [
        # Shift by one voxel: 16 of each 26 surface voxels coincide, 9 lie one step (spacing[axis]) off,
        # one lies min(spacing) = 0.5 mm off, so HD95 is the step in mm along the shifted axis.
        (0, 1.0, 2.0, 17 / 26),
        (1, 0.5, 1.0, 17 / 26),
        (2, 0.4, 0.5, 16 / 26),
    ],
)
def test_hd95_and_surface_dice_on_a_shifted_cube_use_the_reference_spacing(axis, tolerance, hd95, nsd):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    pred = np.roll(ref, 1, axis=axis)
    result = evaluate_case(
        scan(pred, SPACING), scan(ref, SPACING), {"bg": 0, "cube": 1}, hd95=True, surface_mm=tolerance
    )
    cube = result["classes"]["cube"]
    assert cube["hd95"] == pytest.approx(hd95, rel=1e-6)
    assert cube["surface_dice"] == pytest.approx(nsd, rel=1e-6)
    assert result["distance_unit"] == "mm"


def test_distances_of_empty_classes_and_single_slice_volumes():
    ref = np.zeros((6, 6, 1), np.uint8)
    ref[1:4, 1:4, 0] = 1
    pred = np.zeros_like(ref)
    pred[1:4, 2:5, 0] = 1
    pred[5, 5, 0] = 3
    classes = {"square": 1, "absent": 2, "invented": 3}
    result = evaluate_case(scan(pred, (1.0, 1.5, 4.0)), scan(ref, (1.0, 1.5, 4.0)), classes, hd95=True, surface_mm=1.5)
    square, absent, invented = (result["classes"][name] for name in classes)
    # A (X, Y, 1) volume is scored as 2D: a 3x3 square shifted by one 1.5 mm step.
    assert square["hd95"] == pytest.approx(1.5, rel=1e-6)
    assert square["surface_dice"] == pytest.approx(1.0)
    assert math.isnan(absent["hd95"]) and math.isnan(absent["surface_dice"])
    assert invented["hd95"] == math.inf and invented["surface_dice"] == 0.0
    assert summarize([1.0, math.inf, 3.0, nan]) == {
        "mean": math.inf,
        "std": pytest.approx(nan, nan_ok=True),
        "median": 3.0,
        "n": 3,
    }


def test_grid_mismatch_is_a_label_error_naming_both_masks():
    with pytest.raises(LabelError, match="different grids: shape"):
        evaluate_case(scan(np.zeros((4, 5))), scan(np.zeros((4, 4))))
    with pytest.raises(LabelError, match="different grids: grid differs") as info:
        evaluate_case(scan(np.zeros((4, 4)), (0.5, 0.5)), scan(np.zeros((4, 4))))
    assert len(info.value.paths) == 2


def test_parse_classes():
    assert parse_classes("membrane=0, cell=255") == {"membrane": 0, "cell": 255}
    for bad in ("membrane", "a=1,a=2", "a=1,b=1", "a=x", ""):
        with pytest.raises(ConfigError):
            parse_classes(bad)


# -- the folder command ------------------------------------------------------------------


def test_evaluate_command_nifti_end_to_end(tmp_path, capsys):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    for case in ("case_1", "case_2", "case_3", "only_ref", "broken", "truncated"):
        save_nifti(ref / f"{case}.nii.gz", truth, affine)
    save_nifti(pred / "case_1.nii.gz", truth, affine)  # perfect
    save_nifti(pred / "case_2.nii.gz", np.roll(truth, 1, axis=0), affine)  # shifted 2 mm
    save_nifti(pred / "case_3.nii.gz", truth, np.diag([1.0, 1.0, 1.0, 1.0]))  # other grid
    save_nifti(pred / "only_pred.nii.gz", truth, affine)
    (pred / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    (pred / "truncated.nii.gz").write_bytes(gzip.compress(b"\x00" * 400)[:30])
    (pred / "predictions.json").write_text(json.dumps({"classes": {"background": 0, "liver": 1}}))
    before = snapshot(pred), snapshot(ref)

    code = main(
        ["evaluate", "--pred", str(pred), "--ref", str(ref), "--hd95", "--surface-dice-mm", "1.0", "--output", str(out)]
    )

    assert code == 1
    assert (snapshot(pred), snapshot(ref)) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files left
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case", "class", "statistic", "dice", "iou", "hd95", "surface_dice", "pixel_accuracy"]
    per_case = {(r["case"], r["class"]): r for r in rows if not r["statistic"]}
    assert set(per_case) == {(c, k) for c in ("case_1", "case_2") for k in ("background", "liver")}
    assert float(per_case["case_1", "liver"]["dice"]) == 1.0
    assert float(per_case["case_1", "liver"]["hd95"]) == 0.0
    assert float(per_case["case_2", "liver"]["dice"]) == pytest.approx(2 / 3)
    assert float(per_case["case_2", "liver"]["iou"]) == pytest.approx(1 / 2)
    assert float(per_case["case_2", "liver"]["hd95"]) == pytest.approx(2.0)
    assert float(per_case["case_2", "liver"]["surface_dice"]) == pytest.approx(17 / 26, rel=1e-6)
    assert float(per_case["case_2", "liver"]["pixel_accuracy"]) == pytest.approx(1 - 18 / 512)
    summary = {(r["class"], r["statistic"]): r for r in rows if r["statistic"]}
    assert float(summary["liver", "mean"]["dice"]) == pytest.approx(5 / 6)
    assert summary["liver", "n"]["dice"] == "2"
    assert float(summary["", "median"]["pixel_accuracy"]) == pytest.approx(1 - 9 / 512)

    report = json.loads((out / "metrics.json").read_text())
    assert report["classes"] == {"background": 0, "liver": 1}
    assert report["classes_source"] == "predictions.json"
    assert [c["case"] for c in report["cases"]] == ["case_1", "case_2"]
    assert report["summary"]["classes"]["liver"]["hd95"]["mean"] == pytest.approx(1.0)
    assert report["unpaired_predictions"] == ["only_pred"]
    assert report["unpaired_references"] == ["only_ref"]
    failures = {f["case"]: f["reason"] for f in report["failures"]}
    assert set(failures) == {"broken", "case_3", "truncated"}
    assert "broken.nii.gz" in failures["broken"]
    assert "different grids" in failures["case_3"] and "case_3.nii.gz" in failures["case_3"]
    assert "truncated.nii.gz" in failures["truncated"] and "unreadable" in failures["truncated"]

    shown = capsys.readouterr().out
    lines = shown.splitlines()
    assert lines[0].split() == ["case", "class", "dice", "iou", "hd95", "surface_dice", "pixel_acc"]
    assert lines[3].split()[:4] == ["case_2", "background", "0.9814", "0.9636"]  # 476 of 485 voxels shared
    assert lines[3].split()[-1] == "0.9648"
    assert lines[4].split() == ["liver", "0.6667", "0.5000", "2.0000", "0.6538"]
    assert "FAILED case_3:" in shown and "FAILED broken:" in shown
    assert "Predictions without a reference (1): only_pred" in shown
    assert "References without a prediction (1): only_ref" in shown
    assert str(out / "metrics.csv") in shown


def test_evaluate_command_png_masks_with_classes_option(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    truth = np.zeros((6, 8), np.uint8)
    truth[1:4, 2:6] = 255
    guess = truth.copy()
    guess[1, 2:6] = 0  # 4 of 12 cell pixels missed
    for name in ("alpha", "beta"):
        save_png(ref / f"{name}.png", truth)
    save_png(pred / "alpha.png", guess)
    save_png(pred / "beta.png", truth)

    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--classes", "membrane=0,cell=255", "--hd95"])

    assert code == 0
    report = json.loads((pred / "metrics.json").read_text())  # default --output: the prediction folder
    assert report["classes"] == {"membrane": 0, "cell": 255}
    alpha = report["cases"][0]
    assert alpha["case"] == "alpha"
    assert alpha["classes"]["cell"]["dice"] == pytest.approx(16 / 20)
    assert alpha["classes"]["membrane"]["iou"] == pytest.approx(36 / 40)
    assert alpha["pixel_accuracy"] == pytest.approx(44 / 48)
    assert alpha["distance_unit"] == "pixel"
    assert report["failures"] == [] and report["unpaired_predictions"] == []
    assert "alpha  membrane" in capsys.readouterr().out


def test_numbered_pngs_form_one_stack_unless_per_image(tmp_path):
    for folder in ("pred", "ref"):
        for k in range(3):
            save_png(tmp_path / folder / f"img_{k}.png", np.eye(4, dtype=np.uint8) * (k % 2))
    stacked = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert [c["case"] for c in stacked.cases] == ["img"]
    single = evaluate_folders(tmp_path / "pred", tmp_path / "ref", stack_sequences=False)
    assert [c["case"] for c in single.cases] == ["img_0", "img_1", "img_2"]
    assert single.classes == {"label_0": 0, "label_1": 1}  # union over cases
    assert math.isnan(single.cases[0]["classes"]["label_1"]["dice"])  # absent from both in img_0
    assert single.summary["classes"]["label_1"]["dice"]["n"] == 1
    paths = write_reports(single, tmp_path / "reports")
    assert [p.name for p in paths] == ["metrics.csv", "metrics.json"]
    assert json.loads(paths[1].read_text())["cases"][0]["classes"]["label_1"]["dice"] is None


def test_grid_mismatch_fails_that_case_only(tmp_path):
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    moved = np.eye(4)
    moved[:3, 3] = (5.0, 0.0, 0.0)
    for case, pred_affine in (("good", np.eye(4)), ("moved", moved)):
        save_nifti(tmp_path / "ref" / f"{case}.nii.gz", truth)
        save_nifti(tmp_path / "pred" / f"{case}.nii.gz", truth, pred_affine)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert [c["case"] for c in report.cases] == ["good"]
    assert [f.case for f in report.failures] == ["moved"]
    assert "origin (5, 0, 0) vs (0, 0, 0)" in report.failures[0].reason


def test_nothing_to_pair_and_bad_inputs_are_errors_a_user_can_act_on(tmp_path, capsys):
    save_nifti(tmp_path / "pred" / "a.nii.gz", np.zeros((2, 2, 2)))
    save_nifti(tmp_path / "ref" / "b.nii.gz", np.zeros((2, 2, 2)))
    with pytest.raises(ScanError, match="no prediction has a reference with the same case id"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 1
    assert "predictions: a; references: b" in capsys.readouterr().err
    (tmp_path / "pred" / "predictions.json").write_text(json.dumps({"classes": {"a": "one"}}))
    with pytest.raises(ScanError, match="predictions.json"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--pred", "p", "--ref", "r", "--classes", "cell"])
    assert info.value.code == 2
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["ref", "inside-ref", "ref-file", "other-file", "same-folders"])
def test_evaluate_never_writes_into_the_reference_tree_nor_over_a_file(tmp_path, capsys, where):
    """Reports go to --output or the prediction folder; the references are an input, never written."""
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:5, 2:6, 1:3] = 1
    for folder in ("pred", "ref"):
        phantoms.write_nifti(mask, np.eye(4), tmp_path / folder / "c0.nii.gz")
    (tmp_path / "notes.txt").write_text("mine")
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    output = {
        "ref": ref,
        "inside-ref": ref / "metrics",
        "ref-file": ref / "c0.nii.gz",
        "other-file": tmp_path / "notes.txt",
        "same-folders": None,
    }[where]
    args = ["evaluate", "--pred", str(ref if where == "same-folders" else pred), "--ref", str(ref)]
    before = (snapshot(ref), (tmp_path / "notes.txt").read_text())
    assert main(args + (["--output", str(output)] if output is not None else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith("medseg evaluate: error:") and "Traceback" not in err
    assert (snapshot(ref), (tmp_path / "notes.txt").read_text()) == before
    assert not (ref / "metrics").exists()
