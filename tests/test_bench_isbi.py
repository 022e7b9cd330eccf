"""Bench helpers with figures in BENCHMARKS.md: the ISBI 2012 challenge's pixel error
(bench/train_isbi.py) and the label offset (bench/label_offset.py), against known cases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench_module("train_isbi")


@pytest.fixture(scope="module")
def offset():
    return _bench_module("label_offset")


def test_isbi_pixel_error_is_one_minus_the_best_f_score_over_thresholds(bench):
    # Eight cell pixels (255) and two membrane pixels (0); the proposal is P(cell).
    reference = np.array([255] * 8 + [0] * 2)
    probability = np.array([0.9] * 7 + [0.35] + [0.65, 0.05])
    counts = bench.isbi_counts(probability, reference)
    # Threshold 0.0: all ten positive (F 16/18); 0.1-0.3: one false positive (F 16/17, the best);
    # 0.4-0.6: one of each (F 14/16); 0.7-0.8: one false negative (F 14/15); 0.9 and 1.0: none positive.
    assert counts[0].tolist() == [8, 2, 0]
    assert counts[1].tolist() == [8, 1, 0]
    assert counts[5].tolist() == [7, 1, 1]
    assert counts[10].tolist() == [0, 0, 8]
    error, threshold = bench.isbi_pixel_error(counts)
    assert error == pytest.approx(1 / 17)
    assert threshold == pytest.approx(0.1)
    # Not the misclassified fraction, which is 2/10 at the usual 0.5 threshold.
    assert abs(error - 0.2) > 0.1


def test_isbi_pixel_error_is_zero_for_a_perfect_proposal_and_one_for_none(bench):
    reference = np.where(np.random.default_rng(0).random((16, 16)) > 0.2, 255, 0)
    assert bench.isbi_pixel_error(bench.isbi_counts(np.where(reference > 0, 1.0, 0.0), reference))[0] == 0.0
    assert bench.isbi_pixel_error(bench.isbi_counts(np.zeros((16, 16)), reference))[0] == 1.0


def test_label_offset_finds_a_known_shift_per_axis(offset):
    rng = np.random.default_rng(0)
    membrane = (rng.random((64, 64)) < 0.2).astype(float)
    darkness = np.roll(membrane, 2, axis=1)  # the membranes lie 2 px further along axis 1
    values = [offset.shifted_correlation(darkness, membrane, 1, s) for s in offset.SHIFTS]
    assert list(offset.SHIFTS)[int(np.argmax(values))] == 2 and max(values) == pytest.approx(1.0)
    along_other = [offset.shifted_correlation(darkness, membrane, 0, s) for s in offset.SHIFTS]
    assert max(along_other) < 0.2


def test_parabolic_peak_is_exact_for_a_parabola_and_clamps_at_the_ends(offset):
    shifts = [-2, -1, 0, 1, 2]
    assert offset.parabolic_peak(shifts, [-((s - 0.3) ** 2) for s in shifts]) == pytest.approx(0.3)
    assert offset.parabolic_peak(shifts, [-((s + 0.6) ** 2) for s in shifts]) == pytest.approx(-0.6)
    assert offset.parabolic_peak(shifts, [1, 2, 3, 4, 5]) == 2.0
