"""The planner's rules on generated fingerprints: isotropic, anisotropic, 2D, huge, tiny and multi-channel data.

Every plan must validate as a medseg config; the numbers are nnU-Net's rules worked by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medseg.config import config_from_dict
from medseg.plan import rules
from medseg.plan.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.plan.memory import StepMemory, training_step_memory
from medseg.plan.planner import Plan, PlanOptions, make_plan

MR = IntensityStats(mean=350.0, std=170.0, median=340.0, p00_5=30.0, p99_5=870.0, min=0.0, max=1200.0, samples=5000)
CT = IntensityStats(mean=80.0, std=120.0, median=60.0, p00_5=-90.0, p99_5=1100.0, min=-200.0, max=2000.0, samples=5000)


def fingerprint(
    shapes, spacings, modalities=("MR",), codes=None, labels=(0, 1, 2), known=True, stats=None
) -> Fingerprint:
    """A fingerprint as fingerprint_cases would measure it, written out by hand."""
    stats = list(stats or [CT if m == "CT" else MR for m in modalities])
    codes = codes or ["RAS" if len(s) == 3 else "" for s in shapes]
    cases = [
        CaseFingerprint(
            id=f"case{i}",
            kind="nifti",
            shape=list(shape),
            spacing=list(spacing),
            spacing_known=known,
            orientation=code,
            modality=list(modalities),
            label_voxels={v: 1000 for v in labels},
            objects={v: [1, 1000, 1000, 1000] for v in labels if v},
            intensity=stats,
            image_range=[[s.min, s.max] for s in stats],
        )
        for i, (shape, spacing, code) in enumerate(zip(shapes, spacings, codes))
    ]
    return Fingerprint("generated", cases, list(modalities), list(labels), stats, [])


def plan_of(fp: Fingerprint, **options) -> tuple[Plan, dict]:
    plan = make_plan(
        fp,
        PlanOptions(
            name="t", data={"images": Path("/data/im"), "labels": Path("/data/lb")}, output_dir=Path("/runs"), **options
        ),
    )
    config = config_from_dict(plan.as_dict())  # every plan is a valid config
    return plan, config


def jittered(rng, n, shape, spacing, shape_jitter=0.1, spacing_jitter=0.0):
    shapes = [[int(round(s * rng.uniform(1 - shape_jitter, 1 + shape_jitter))) for s in shape] for _ in range(n)]
    spacings = [[float(s * rng.uniform(1 - spacing_jitter, 1 + spacing_jitter)) for s in spacing] for _ in range(n)]
    return shapes, spacings


def test_isotropic_mr_gets_nnunets_hippocampus_plan():
    """60 MR volumes of about 36x50x35 at 1 mm: nnU-Net v2 plans 3D, patch 40x56x40, 4 stages of 32-256
    features with instance norm, batch 2 (5% of 60 cases' voxels), spacing 1x1x1 and a z-score per image."""
    shapes, spacings = jittered(np.random.default_rng(0), 60, (36, 50, 35), (1.0, 1.0, 1.0), 0.08)
    plan, config = plan_of(fingerprint(shapes, spacings))
    assert config.preprocess.spacing == [1.0, 1.0, 1.0] and config.preprocess.orientation == "RAS"
    assert config.model.spatial_dims == 3 and config.train.patch_size == [40, 56, 40]
    assert config.model.depth == 3 and config.model.features == 32  # 40 / 2^3 = 5: a 4-8 voxel bottleneck
    assert config.model.options == {"norm": "instance", "dropout": 0.0, "max_features": 320}
    assert config.train.batch_size == 2 and config.preprocess.intensity == "zscore"
    assert config.infer.roi_size == [40, 56, 40] and config.data.split.mode == "kfold"
    assert "5% of the dataset" in plan.sections["train"]["batch_size"].rule
    # the stable recipe (issue #19 item 3): instance norm above, the poly schedule, validation on averaged weights
    assert config.train.schedule == "poly" and config.train.ema_decay == 0.998


def test_a_short_time_budget_plans_half_the_width_and_adam():
    """Under 4 hours nnU-Net's 250,000 SGD steps are out of reach: the plan halves the width (a third of
    the step cost) and trains with Adam; from 4 hours on, and with no budget, it is nnU-Net's recipe."""
    shapes, spacings = jittered(np.random.default_rng(0), 60, (36, 50, 35), (1.0, 1.0, 1.0), 0.08)
    fp = fingerprint(shapes, spacings)
    plan, short = plan_of(fp, minutes=30)
    assert short.model.features == 16 and short.train.optimizer == "adam" and short.train.learning_rate == 3e-3
    assert short.train.time_budget_minutes == 30 and short.train.ema_decay == 0.998
    assert "half nnU-Net's 32" in plan.sections["model"]["features"].rule
    assert short.train.patch_size == [40, 56, 40] and short.train.batch_size == 2  # the data's rules are unchanged
    for minutes in (None, 240):
        _, full = plan_of(fp, minutes=minutes)
        assert full.model.features == 32 and full.train.optimizer == "sgd" and full.train.learning_rate == 0.01


def test_anisotropic_volumes_take_the_tenth_percentile_and_go_2d():
    """0.6 x 0.6 x 3-4.5 mm with 20 slices: the coarse axis is over 3x coarser and has under a third of the
    voxels, so it gets the 10th percentile of its spacings (nnU-Net), and the plan is 2D across it."""
    rng = np.random.default_rng(1)
    shapes = [[320, 300, 20]] * 30
    spacings = [[0.6, 0.6, float(z)] for z in rng.uniform(3.0, 4.5, 30)]
    plan, config = plan_of(fingerprint(shapes, spacings, codes=["LPS"] * 30))
    z = np.array(spacings)[:, 2]
    assert config.preprocess.spacing[2] == pytest.approx(np.percentile(z, 10), rel=1e-4)
    assert config.preprocess.spacing[2] < np.median(z) and config.preprocess.spacing[:2] == [0.6, 0.6]
    assert config.model.spatial_dims == 2 and config.train.slice_axis == 2
    assert "10th percentile" in plan.sections["preprocess"]["spacing"].rule
    patch = config.train.patch_size
    assert patch == [320, 320] and all(p % 2**config.model.depth == 0 for p in patch)
    assert 4 <= min(patch) / 2**config.model.depth < 8 and config.model.options["max_features"] == 512


def test_target_spacing_rule_by_hand():
    spacings = np.array([[1.0, 1.0, 5.0], [1.0, 1.0, 6.0], [1.0, 1.0, 2.0], [1.0, 1.0, 5.0]])
    shapes = np.array([[200, 200, 20]] * 4)
    assert rules.target_spacing(spacings, shapes).value == [1.0, 1.0, pytest.approx(np.percentile([5, 6, 2, 5], 10))]
    many_slices = np.array([[200, 200, 100]] * 4)  # coarse but not few voxels: the median stays
    assert rules.target_spacing(spacings, many_slices).value == [1.0, 1.0, 5.0]
    fine = np.array([[1.0, 1.0, z] for z in (0.2, 0.3, 4.0, 4.0, 4.0)])  # never finer than the other axes
    assert rules.target_spacing(fine, np.array([[300, 300, 10]] * 5)).value == [1.0, 1.0, pytest.approx(1.0, abs=1e-4)]


def test_mixed_orientations_are_measured_along_the_target_axes():
    """A case stored S-R-A (axes permuted) has its spacing and shape reordered to the majority's RAS."""
    shapes, spacings = [[10, 20, 30], [10, 20, 30], [30, 10, 20]], [[1, 2, 3], [1, 2, 3], [3, 1, 2]]
    codes = ["RAS", "LPS", "SRA"]
    assert rules.orientation(codes).value == "LPS"  # a three-way tie: the first code alphabetically
    grid_shapes, grid_spacings = rules.grids_in(shapes, spacings, codes, "RAS")
    assert grid_shapes.tolist() == [[10, 20, 30]] * 3 and grid_spacings.tolist() == [[1, 2, 3]] * 3
    assert rules.orientation(["LPS", "LPS", "RAS"]).value == "LPS"
    assert rules.orientation(["", ""]).value is None


def test_2d_images_keep_their_grid():
    shapes, spacings = jittered(np.random.default_rng(2), 30, (512, 512), (1.0, 1.0), 0.0)
    plan, config = plan_of(fingerprint(shapes, spacings, modalities=("SM",), known=False, labels=(0, 255)))
    assert (
        config.model.spatial_dims == 2 and config.preprocess.spacing is None and config.preprocess.orientation is None
    )
    assert config.train.patch_size == [512, 512] and config.model.depth == 7  # 512 / 2^7 = 4
    assert config.data.classes == {"background": 0, "class_255": 255} and config.model.out_channels == 2
    assert config.preprocess.intensity == "zscore" and config.augment.rotate_degrees == 180


def test_huge_ct_fits_the_memory_budget_and_a_smaller_budget_a_smaller_patch():
    shapes, spacings = jittered(np.random.default_rng(3), 40, (512, 512, 400), (0.7, 0.7, 1.0), 0.05)
    plan, config = plan_of(fingerprint(shapes, spacings, modalities=("CT",)))
    patch, depth = config.train.patch_size, config.model.depth
    assert config.model.spatial_dims == 3 and math.prod(patch) <= 256**3
    assert all(p % 2**depth == 0 for p in patch) and 4 <= min(patch) / 2**depth < 8
    model = {**config.model.model_dump(), "options": config.model.options}
    memory = training_step_memory(model, patch)
    assert memory.total(config.train.batch_size) <= 10e9 and config.train.batch_size == 2
    assert "shrunk" in plan.sections["train"]["patch_size"].rule
    assert config.preprocess.intensity == "dataset_zscore"
    assert config.preprocess.channel_stats[0].model_dump() == {"low": -90.0, "high": 1100.0, "mean": 80.0, "std": 120.0}
    _, small = plan_of(fingerprint(shapes, spacings, modalities=("CT",)), memory_gb=2.0)
    assert math.prod(small.train.patch_size) < math.prod(patch)
    assert training_step_memory({**model, "depth": small.model.depth}, small.train.patch_size).total(2) <= 2e9


def test_tiny_volumes_are_planned_2d_with_one_pooling():
    plan, config = plan_of(fingerprint([[8, 8, 8]] * 10, [[1.0, 1.0, 1.0]] * 10))
    assert config.model.spatial_dims == 2 and config.train.patch_size == [8, 8] and config.model.depth == 1
    assert config.train.batch_size == 4  # 5% of 10 x 8^3 voxels is 4 patches of 8x8
    assert "too thin" in plan.sections["model"]["spatial_dims"].rule


def test_multichannel_ct_has_stats_per_channel_and_mixed_modalities_zscore_per_image():
    shapes, spacings = jittered(np.random.default_rng(4), 10, (96, 96, 64), (1.0, 1.0, 1.5), 0.05)
    _, ct = plan_of(fingerprint(shapes, spacings, modalities=("CT", "CT"), stats=[CT, MR]))
    assert ct.model.in_channels == 2 and ct.preprocess.intensity == "dataset_zscore"
    assert [s.mean for s in ct.preprocess.channel_stats] == [80.0, 350.0]
    plan, mixed = plan_of(fingerprint(shapes, spacings, modalities=("CT", "MR")))
    assert mixed.model.in_channels == 2 and mixed.preprocess.intensity == "zscore"
    assert "mix modalities" in plan.sections["preprocess"]["intensity"].rule


def test_batch_grows_to_the_budget_and_switches_to_batch_norm():
    memory = StepMemory(fixed=100, per_sample=1000)
    assert rules.batch_size(memory, 100 + 40 * 1000, [10, 10], 1e9).value == 40  # memory-bound
    assert rules.batch_size(memory, 100 + 40 * 1000, [10, 10], 2000).value == 2  # 5% of 2000 voxels: the minimum
    assert rules.batch_size(memory, 100 + 40 * 1000, [10, 10], 20000).value == 10  # 5% of 20000 voxels: 10 patches
    assert rules.norm_layer(15).value == "instance" and rules.norm_layer(16).value == "batch"
    shapes, spacings = jittered(np.random.default_rng(5), 400, (64, 64), (1.0, 1.0), 0.0)
    _, config = plan_of(fingerprint(shapes, spacings, modalities=("SM",), known=False))
    assert config.train.batch_size >= 16 and config.model.options["norm"] == "batch"


def test_fit_patch_shrinks_the_axis_largest_relative_to_the_median():
    """With memory proportional to the patch's voxels, the patch shrinks along the axis that is largest
    relative to the median image until a batch of 2 fits, one 2^depth step at a time."""

    def memory_of(patch, depth):
        return StepMemory(0, math.prod(patch))

    patch, depth, memory = rules.fit_patch([200, 100, 100], [1.0, 1.0, 1.0], memory_of, budget=2 * 64 * 64 * 64)
    assert memory.total(2) <= 2 * 64**3 and all(p % 2**depth.value == 0 for p in patch.value)
    assert patch.value[0] >= patch.value[1] and patch.value[0] / 200 <= patch.value[1] / 100 + 0.33
    whole, _, _ = rules.fit_patch([36, 50, 35], [1.0, 1.0, 1.0], memory_of, budget=10**9)
    assert whole.value == [40, 56, 40] and "covers it whole" in whole.rule
    assert rules.depth_for([40, 56, 40]) == 3 and rules.depth_for([512, 512]) == 7 and rules.depth_for([3, 3]) == 1


def test_split_follows_the_manifest_folds_or_draws_five():
    assert rules.split(60, [0, 1, 2, 3, 4] * 12).value == {"mode": "kfold", "folds": 5, "fold": 0}
    assert rules.split(10, []).value["mode"] == "kfold" and rules.split(3, []).value["mode"] == "fraction"


def test_time_budget_and_overrides_are_written_with_their_reason():
    shapes, spacings = jittered(np.random.default_rng(6), 10, (64, 64, 32), (1.0, 1.0, 1.0), 0.0)
    plan, config = plan_of(fingerprint(shapes, spacings), minutes=30)
    assert config.train.time_budget_minutes == 30.0
    plan.override({"train": {"epochs": 3}, "model": {"options": {"dropout": 0.1}}})
    assert plan.sections["train"]["epochs"].value == 3 and "--set" in plan.sections["train"]["epochs"].rule
    assert config_from_dict(plan.as_dict()).model.options["dropout"] == 0.1
