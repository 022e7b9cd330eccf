"""The ISBI 2012 challenge's pixel error (medseg.evaluation.metrics, `medseg evaluate --isbi`) and the
label offset (medseg.evaluation.alignment, reported by bench/label_offset.py), against known cases."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from medseg.cli import main
from medseg.evaluation.alignment import parabolic_peak, shifted_correlation
from medseg.evaluation.metrics import isbi_counts, isbi_pixel_error

SHIFTS = range(-3, 4)


def test_isbi_pixel_error_is_one_minus_the_best_f_score_over_thresholds():
    # Eight cell pixels (255) and two membrane pixels (0); the proposal is P(cell).
    reference = np.array([255] * 8 + [0] * 2)
    probability = np.array([0.9] * 7 + [0.35] + [0.65, 0.05])
    counts = isbi_counts(probability, reference)
    # Threshold 0.0: all ten positive (F 16/18); 0.1-0.3: one false positive (F 16/17, the best);
    # 0.4-0.6: one of each (F 14/16); 0.7-0.8: one false negative (F 14/15); 0.9 and 1.0: none positive.
    assert counts[0].tolist() == [8, 2, 0]
    assert counts[1].tolist() == [8, 1, 0]
    assert counts[5].tolist() == [7, 1, 1]
    assert counts[10].tolist() == [0, 0, 8]
    error, threshold = isbi_pixel_error(counts)
    assert error == pytest.approx(1 / 17)
    assert threshold == pytest.approx(0.1)
    # Not the misclassified fraction, which is 2/10 at the usual 0.5 threshold.
    assert abs(error - 0.2) > 0.1


def test_isbi_pixel_error_is_zero_for_a_perfect_proposal_and_one_for_none():
    reference = np.where(np.random.default_rng(0).random((16, 16)) > 0.2, 255, 0)
    assert isbi_pixel_error(isbi_counts(np.where(reference > 0, 1.0, 0.0), reference))[0] == 0.0
    assert isbi_pixel_error(isbi_counts(np.zeros((16, 16)), reference))[0] == 1.0


def test_label_offset_finds_a_known_shift_per_axis():
    rng = np.random.default_rng(0)
    membrane = (rng.random((64, 64)) < 0.2).astype(float)
    darkness = np.roll(membrane, 2, axis=1)  # the membranes lie 2 px further along axis 1
    values = [shifted_correlation(darkness, membrane, 1, s) for s in SHIFTS]
    assert list(SHIFTS)[int(np.argmax(values))] == 2 and max(values) == pytest.approx(1.0)
    along_other = [shifted_correlation(darkness, membrane, 0, s) for s in SHIFTS]
    assert max(along_other) < 0.2


def test_parabolic_peak_is_exact_for_a_parabola_and_clamps_at_the_ends():
    shifts = [-2, -1, 0, 1, 2]
    assert parabolic_peak(shifts, [-((s - 0.3) ** 2) for s in shifts]) == pytest.approx(0.3)
    assert parabolic_peak(shifts, [-((s + 0.6) ** 2) for s in shifts]) == pytest.approx(-0.6)
    assert parabolic_peak(shifts, [1, 2, 3, 4, 5]) == 2.0


def test_evaluate_isbi_reports_the_challenge_error_per_case_and_pooled(tmp_path, capsys):
    """Pooled as the challenge pools its slices (sum the counts, then the F-score), not a mean of per-case errors."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    cell, membrane = 255, 0
    # case a: 8 cell pixels, the prediction misses one (tp 7, fp 0, fn 1); case b: 2 cell pixels, one invented
    # (tp 2, fp 1, fn 0). Per case 1/15 and 1/5; pooled tp 9, fp 1, fn 1: 1 - 18/20 = 0.1 (the mean would be 0.133).
    a_ref = np.array([[cell] * 4, [cell] * 4, [membrane] * 4, [membrane] * 4], dtype=np.uint8)
    a_pred = a_ref.copy()
    a_pred[0, 0] = membrane
    b_ref = np.full((4, 4), membrane, dtype=np.uint8)
    b_ref[0, :2] = cell
    b_pred = b_ref.copy()
    b_pred[3, 3] = cell
    for name, (p, r) in {"a": (a_pred, a_ref), "b": (b_pred, b_ref)}.items():
        Image.fromarray(p).save(pred / f"{name}.png")
        Image.fromarray(r).save(ref / f"{name}.png")
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--per-image", "--isbi"]) == 0
    out = capsys.readouterr().out
    assert "ISBI 2012 pixel error" in out and "0.1000" in out
    report = json.loads((pred / "metrics.json").read_text())
    errors = {c["case"]: c["isbi_pixel_error"] for c in report["cases"]}
    assert errors == {"a": pytest.approx(1 / 15), "b": pytest.approx(1 / 5)}
    assert report["summary"]["isbi_pixel_error"] == pytest.approx(0.1)
    rows = list(csv.reader((pred / "metrics.csv").read_text().splitlines()))
    assert rows[0][-1] == "isbi_pixel_error" and float(rows[-1][-1]) == pytest.approx(0.1)


def test_evaluate_without_isbi_has_no_isbi_figures(tmp_path):
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / folder / "a.png")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 0
    report = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert "isbi_pixel_error" not in report["summary"] and "isbi_counts" not in report["cases"][0]
