"""`medseg evaluate` across grids: exact reorientation, refusals that give the real offset, --resample nearest."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import snapshot
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from medseg.cli import main
from medseg.errors import ConfigError, LabelError
from medseg.evaluation.evaluate import evaluate_case, evaluate_folders
from medseg.geometry import Geometry
from medseg.evaluation.grids import match_axes, reoriented, world_offset
from medseg.ingest import Scan, ScanRef
from medseg.data.phantoms import rotation

# Every orientation code: each of the 6 orders of the three world axes, each axis either way.
AXIS_CODES = [
    "".join(pair[flip] for pair, flip in zip(order, flips, strict=True))
    for order in itertools.permutations((("R", "L"), ("A", "P"), ("S", "I")))
    for flips in itertools.product((0, 1), repeat=3)
]


def scan(array, geometry: Geometry, case: str) -> Scan:
    return Scan(ScanRef(case, "nifti", (Path(f"/masks/{case}.nii.gz"),)), np.asarray(array)[None], geometry, "SEG")


def to_orientation(array: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in the axis order ``code`` (built with nibabel, not with medseg.evaluation.grids)."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(code)))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def oblique_affine() -> np.ndarray:
    """Anisotropic, slightly rotated and off-origin: a grid no axis code describes exactly."""
    affine = np.eye(4)
    affine[:3, :3] = rotation((8, -5, 12)) @ np.diag([0.8, 1.25, 2.0])
    affine[:3, 3] = (-31.0, 12.5, 4.0)
    return affine


def ellipsoid(geometry: Geometry, centre=(14.0, 17.0, 20.0), radii=(9.0, 12.0, 15.0)) -> np.ndarray:
    """A smooth, off-centre, anisotropic phantom sampled on any grid from its world definition."""
    index = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.shape], indexing="ij"), axis=-1)
    world = geometry.world(index)
    return ((((world - centre) / radii) ** 2).sum(axis=-1) <= 1).astype(np.uint8)


def offset_in(message: str) -> float:
    found = re.search(r"up to ([0-9.]+) mm", message)
    assert found, message
    return float(found.group(1))


def save_nifti(path: Path, array, affine) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine), str(path))


# -- exact reorientation -----------------------------------------------------------------

RANDOM_LABELS = np.random.default_rng(16).integers(0, 3, size=(7, 9, 11)).astype(np.uint8)


def test_the_48_axis_codes_are_distinct_and_complete():
    assert len(set(AXIS_CODES)) == 48 and {"RAS", "LPS", "LAS", "SAR", "IPL"} <= set(AXIS_CODES)


@pytest.mark.parametrize("code", AXIS_CODES)
def test_reference_in_any_orientation_scores_dice_one(code):
    # Random labels: any wrong transpose or flip would score near chance, not 1.
    affine = oblique_affine()
    pred = scan(RANDOM_LABELS, Geometry(affine, RANDOM_LABELS.shape), "pred")
    array, ref_affine = to_orientation(RANDOM_LABELS, affine, code)
    ref = scan(array, Geometry(ref_affine, array.shape), "ref")
    assert ref.geometry.orientation == code

    result = evaluate_case(pred, ref, {"bg": 0, "one": 1, "two": 2})

    assert {name: row["dice"] for name, row in result["classes"].items()} == {"bg": 1.0, "one": 1.0, "two": 1.0}
    assert result["pixel_accuracy"] == 1.0
    if code == "RAS":
        assert result["grid"] == "same" and result["notes"] == []
    else:
        assert result["grid"] == "reoriented"
        note = (
            f"prediction reoriented RAS -> {code} onto the reference grid "
            "(exact: axes permuted/flipped, no interpolation)"
        )
        assert result["notes"] == [note]


@pytest.mark.parametrize("code", ["SLP", "IPR", "LAS"])
def test_distances_after_reorientation_are_measured_along_the_right_axis(code):
    # A cube shifted one 2 mm step along the prediction's first axis: HD95 is 2 mm in every orientation.
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    pred = scan(np.roll(truth, 1, axis=0), Geometry(affine, truth.shape), "pred")
    array, ref_affine = to_orientation(truth, affine, code)
    result = evaluate_case(
        pred, scan(array, Geometry(ref_affine, array.shape), "ref"), {"cube": 1}, hd95=True, surface_mm=1.0
    )
    cube = result["classes"]["cube"]
    assert cube["dice"] == pytest.approx(2 / 3)
    assert cube["hd95"] == pytest.approx(2.0, rel=1e-6)
    assert cube["surface_dice"] == pytest.approx(17 / 26, rel=1e-6)


def test_a_transposed_2d_grid_is_reoriented():
    values = np.arange(35, dtype=np.uint8).reshape(5, 7) % 4
    swapped = np.zeros((4, 4))
    swapped[1, 0], swapped[0, 1], swapped[2, 2], swapped[3, 3] = 0.5, 0.3, 1.0, 1.0  # axis 0 runs along y
    pred = scan(values, Geometry.from_spacing((5, 7), (0.3, 0.5)), "pred")
    ref = scan(values.T, Geometry(swapped, (7, 5)), "ref")
    result = evaluate_case(pred, ref)
    assert result["grid"] == "reoriented" and result["pixel_accuracy"] == 1.0


def test_match_axes_reads_the_permutation_from_the_affines():
    affine = oblique_affine()
    moving = Geometry(affine, (7, 9, 11))
    array, fixed_affine = to_orientation(RANDOM_LABELS, affine, "PSL")
    fixed = Geometry(fixed_affine, array.shape)
    ornt = match_axes(moving, fixed)
    assert np.allclose(reoriented(moving, ornt).affine, fixed.affine)
    assert reoriented(moving, ornt).shape == fixed.shape == (9, 11, 7)
    assert world_offset(moving, fixed) == pytest.approx(0.0, abs=1e-9)
    assert match_axes(moving, Geometry.from_spacing((7, 9), (1.0, 1.0))) is None  # 3D vs 2D: nothing to match


# -- refusals that say how far apart the grids are ------------------------------------------


@pytest.mark.parametrize("code", ["RAS", "LPS", "ASR"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reference_shifted_by_one_voxel_is_refused_with_that_offset(code, axis):
    affine = np.diag([0.75, 1.5, 3.0, 1.0])
    pred = scan(RANDOM_LABELS, Geometry(affine, RANDOM_LABELS.shape), "pred")
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, axis]  # one voxel along the prediction's axis
    array, ref_affine = to_orientation(RANDOM_LABELS, shifted, code)
    with pytest.raises(LabelError) as info:
        evaluate_case(pred, scan(array, Geometry(ref_affine, array.shape), "ref"))
    message = str(info.value)
    assert offset_in(message) == pytest.approx(affine[axis, axis])  # not the distance between unmatched corners
    assert "different grids: grid differs by up to" in message and "after matching axes" in message
    assert "--resample nearest" in message
    assert [p.name for p in info.value.paths] == ["pred.nii.gz", "ref.nii.gz"]


def test_other_shape_and_spacing_is_refused_naming_both_then_resampled_nearest():
    pred_grid = Geometry.from_spacing((32, 36, 30), (1.0, 1.0, 1.5))
    ref_affine = np.diag([-1.5, 1.5, 2.5, 1.0])
    ref_affine[:3, 3] = (40.3, 0.4, 0.7)
    ref_grid = Geometry(ref_affine, (26, 24, 18))
    pred, ref = scan(ellipsoid(pred_grid), pred_grid, "pred"), scan(ellipsoid(ref_grid), ref_grid, "ref")

    with pytest.raises(LabelError) as info:
        evaluate_case(pred, ref, {"bg": 0, "organ": 1})
    message = str(info.value)
    assert "shape (32, 36, 30) vs (26, 24, 18)" in message
    assert "spacing (1, 1, 1.5) vs (1.5, 1.5, 2.5) mm" in message
    assert "--resample nearest" in message
    # Corner (0, 0, 0) of the prediction against the reference's matching corner (its x runs to the left).
    assert offset_in(message) == pytest.approx(
        float(
            np.max(
                np.linalg.norm(
                    pred_grid.corners() - reoriented(ref_grid, match_axes(ref_grid, pred_grid)).corners(), axis=-1
                )
            )
        ),
        abs=1e-3,
    )

    result = evaluate_case(pred, ref, {"bg": 0, "organ": 1}, resample="nearest")
    assert result["grid"] == "resampled"
    assert result["classes"]["organ"]["dice"] > 0.95  # sampling the same ellipsoid twice, 1-2.5 mm voxels
    assert result["classes"]["organ"]["dice"] < 1.0  # interpolated, so not claimed exact
    assert "resampled onto the reference grid by nearest neighbour" in result["notes"][0]
    assert "(26, 24, 18)" in result["notes"][0]


def test_nearest_resampling_picks_the_nearest_voxel_and_counts_what_lies_outside():
    # Reference voxel centres at prediction indices 1.1, 3.1, 5.1, 7.1, 9.1 (the last outside a 9-voxel axis).
    pred_grid = Geometry.from_spacing((9, 8, 8), (1.0, 1.0, 1.0))
    values = np.random.default_rng(5).integers(0, 3, size=pred_grid.shape).astype(np.uint8)
    ref_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ref_affine[:3, 3] = (1.1, 0.9, 1.2)
    expected = np.zeros((5, 4, 4), np.uint8)
    expected[:4] = values[1::2, 1::2, 1::2]
    for code in ("RAS", "SLP"):  # SLP: a 3-cycle of the axes, so a transposed index map would show
        array, affine = to_orientation(expected, ref_affine, code)
        result = evaluate_case(
            scan(values, pred_grid, "pred"), scan(array, Geometry(affine, array.shape), "ref"), resample="nearest"
        )
        assert result["pixel_accuracy"] == 1.0, code
        assert result["notes"][0].endswith("; 16 of 80 reference voxels lie outside the prediction and count as 0")


def test_a_prediction_far_from_its_reference_is_not_resampled_into_an_empty_mask():
    pred_grid = Geometry.from_spacing((4, 4, 4), (1.0, 1.0, 1.0), origin=(100.0, 0.0, 0.0))
    ref_grid = Geometry.from_spacing((5, 5, 5), (1.0, 1.0, 1.0))
    with pytest.raises(LabelError, match="does not overlap the reference grid at all"):
        evaluate_case(
            scan(np.ones((4, 4, 4), np.uint8), pred_grid, "pred"),
            scan(np.ones((5, 5, 5), np.uint8), ref_grid, "ref"),
            resample="nearest",
        )


def test_grids_without_physical_size_are_never_resampled():
    pred_grid = Geometry.from_spacing((4, 6), (1.0, 1.0), spacing_known=False)
    ref_grid = Geometry.from_spacing((6, 4), (1.0, 1.0), spacing_known=False)
    with pytest.raises(LabelError, match="no physical pixel size") as info:
        evaluate_case(
            scan(np.zeros((4, 6), np.uint8), pred_grid, "pred"),
            scan(np.zeros((6, 4), np.uint8), ref_grid, "ref"),
            resample="nearest",
        )
    assert "reference's shape (6, 4)" in str(info.value)


def test_unknown_resample_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--resample nearest"):
        evaluate_folders(tmp_path, tmp_path, resample="linear")


# -- the command ------------------------------------------------------------------------------


def test_evaluate_command_nifti_in_two_orientations(tmp_path, capsys):
    """The issue's case: reference in LAS, prediction in LPS, the same 8 world corners."""
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    las = np.diag([-1.0, 1.2, 2.0, 1.0])
    las[:3, 3] = (80.0, -120.0, -40.0)
    truth = ellipsoid(Geometry(las, (90, 100, 40)), centre=(40.0, -60.0, 0.0), radii=(20.0, 30.0, 25.0))
    save_nifti(ref / "flipped.nii.gz", truth, las)
    lps_array, lps = to_orientation(truth, las, "LPS")
    save_nifti(pred / "flipped.nii.gz", lps_array, lps)
    assert np.allclose(
        Geometry(lps, lps_array.shape).corners()[[0, 7]], Geometry(las, truth.shape).corners()[[2, 5]]
    )  # same corners, y reversed
    coarse = np.diag([-2.0, 2.4, 4.0, 1.0])  # the same field on a grid half as fine
    coarse[:3, 3] = (79.5, -119.4, -39.0)
    coarse_grid = Geometry(coarse, (45, 50, 20))
    save_nifti(ref / "coarse.nii.gz", truth, las)
    save_nifti(pred / "coarse.nii.gz", ellipsoid(coarse_grid, (40.0, -60.0, 0.0), (20.0, 30.0, 25.0)), coarse)
    before = snapshot(pred), snapshot(ref)

    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--classes", "bg=0,organ=1", "--output", str(out)])

    assert code == 1  # the coarse case is refused without --resample
    report = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["flipped"]
    flipped = report["cases"][0]
    assert flipped["classes"]["organ"]["dice"] == 1.0 and flipped["grid"] == "reoriented"
    assert flipped["notes"][0].startswith("prediction reoriented LPS -> LAS")
    assert report["resample"] is None and report["resampled_cases"] == []
    (failure,) = report["failures"]
    assert failure["case"] == "coarse" and "--resample nearest" in failure["reason"]
    assert "shape (45, 50, 20) vs (90, 100, 40)" in failure["reason"]
    assert "spacing (2, 2.4, 4) vs (1, 1.2, 2) mm" in failure["reason"]
    shown = capsys.readouterr().out
    assert "note flipped: prediction reoriented LPS -> LAS onto the reference grid (exact" in shown

    code = main(
        [
            "evaluate",
            "--pred",
            str(pred),
            "--ref",
            str(ref),
            "--classes",
            "bg=0,organ=1",
            "--output",
            str(out),
            "--resample",
            "nearest",
        ]
    )

    assert code == 0
    assert (snapshot(pred), snapshot(ref)) == before  # inputs untouched
    report = json.loads((out / "metrics.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert report["resample"] == "nearest" and report["resampled_cases"] == ["coarse"] and report["failures"] == []
    assert cases["flipped"]["grid"] == "reoriented"  # exact wherever exact is possible, even with --resample
    assert cases["coarse"]["grid"] == "resampled" and cases["coarse"]["classes"]["organ"]["dice"] > 0.95
    shown = capsys.readouterr().out
    assert "note coarse: prediction resampled onto the reference grid by nearest neighbour" in shown
    assert "Resampling: nearest neighbour onto the reference grid, in 1 case(s)" in shown
    with pytest.raises(SystemExit):
        main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--resample", "cubic"])
