"""The rules that turn a fingerprint into a plan: each a small pure function returning its value and,
in words, why, so that the config it writes explains itself.

The rules are nnU-Net v2's (Isensee et al., Nature Methods 2021; its ExperimentPlanner) where
medseg has the same knobs, and say so where medseg differs: its U-Net pools every axis alike
(nnU-Net pools an axis only while its spacing is within 2x of the finest), so strongly
anisotropic volumes are planned 2D; memory is counted on the meta device (``medseg.plan.memory``)
instead of estimated from a calibrated formula.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.plan.memory import StepMemory

__all__ = [
    "ANISOTROPY",
    "Choice",
    "augmentation",
    "batch_size",
    "class_names",
    "depth_for",
    "dimensionality",
    "fit_patch",
    "grids_in",
    "initial_patch",
    "loss",
    "norm_layer",
    "normalisation",
    "orientation",
    "recipe",
    "resampled_shapes",
    "sliding_window",
    "split",
    "target_spacing",
    "width",
]

ANISOTROPY = 3.0  # nnU-Net's anisotropy threshold: an axis this many times coarser than the others
BOTTLENECK = 4  # the smallest side of the deepest feature map, in voxels (nnU-Net: 4)
MAX_DEPTH = 8  # the config's limit (2^8 = 256: every side a multiple of 256 already)
MIN_3D_SIDE = 16  # a volume thinner than this (in voxels, at the target spacing) cannot pool twice: 2D
PATCH_VOXELS = {2: 2048**2, 3: 256**3}  # nnU-Net's starting patch size, before the memory budget trims it
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
MIN_BATCH = 2
DATASET_FRACTION = 0.05  # one batch covers at most 5% of the dataset's voxels (nnU-Net)
# A time budget under this many minutes is far from nnU-Net's 250,000 steps on any one machine: the plan takes
# the short-budget recipe (a narrower network, Adam), which learns in hundreds of steps (BENCHMARKS.md).
SHORT_BUDGET_MINUTES = 240.0
SHORT_BUDGET_FEATURES = 16
BATCH_NORM_FROM = 16  # batch statistics over fewer samples than this are noisy (Wu & He 2018, Group Norm)
MAX_BATCH = 4096
MAX_BATCH_VOXELS = 1 << 28  # the config's limit on batch x patch voxels


@dataclass(frozen=True)
class Choice:
    """A planned value and the rule that chose it (a comment above the value in the YAML)."""

    value: Any
    rule: str


def _x(values: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{float(v):.{digits}g}" for v in values)


# --- the grid ---------------------------------------------------------------------------------------------------

_WORLD_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def orientation(codes: Sequence[str]) -> Choice:
    """The orientation most cases already have, so that few are reoriented (a transpose/flip, exact)."""
    usable = [c for c in codes if len(c) == 3 and "?" not in c]
    if not usable:
        return Choice(None, "2D images or no known orientation: the pixel grid is kept as it is")
    counts = Counter(usable)
    best = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]
    others = "" if len(counts) == 1 else f"; the other {len(usable) - counts[best]} are reoriented to it"
    return Choice(
        best,
        f"the orientation {counts[best]} of {len(usable)} volumes already have, so that the axes mean the "
        f"same anatomy in every case{others}",
    )


def grids_in(
    shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]], codes: Sequence[str], target: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each case's shape and spacing along the axes of the ``target`` orientation (as given when None)."""
    if target is None:
        return np.asarray(shapes, dtype=float), np.asarray(spacings, dtype=float)
    out_shapes, out_spacings = [], []
    for shape, spacing, code in zip(shapes, spacings, codes):
        if len(code) != 3 or "?" in code:
            out_shapes.append(list(shape))
            out_spacings.append(list(spacing))
            continue
        axis_of = {_WORLD_AXIS[c]: i for i, c in enumerate(code)}
        order = [axis_of[_WORLD_AXIS[c]] for c in target]
        out_shapes.append([shape[i] for i in order])
        out_spacings.append([spacing[i] for i in order])
    return np.asarray(out_shapes, dtype=float), np.asarray(out_spacings, dtype=float)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> Choice:
    """nnU-Net's target spacing: the median per axis, except along a strongly anisotropic axis."""
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    rule = f"the median voxel size per axis over the cases ({_x(target)} mm)"
    if others:
        coarse = target[worst] > ANISOTROPY * max(target[i] for i in others)
        few = median_shape[worst] * ANISOTROPY < min(median_shape[i] for i in others)
        if coarse and few:
            tenth = float(np.percentile(spacings[:, worst], 10))
            tenth = max(tenth, max(target[i] for i in others) + 1e-5)
            same = " (the same here)" if np.isclose(tenth, target[worst]) else ""
            rule += (
                f"; axis {worst} is over {ANISOTROPY:g}x coarser than the others and has under 1/{ANISOTROPY:g} "
                f"of their voxels, so it takes the 10th percentile of its spacings instead ({tenth:.3g} mm{same}): "
                "resampling the finer cases of that axis to the median would blur them (nnU-Net's anisotropy rule)"
            )
            target[worst] = tenth
    return Choice([float(f"{v:.5g}") for v in target], rule)


def resampled_shapes(shapes: np.ndarray, spacings: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """Each case's shape once resampled to ``target`` spacing."""
    return np.round(shapes * spacings / np.asarray(target, dtype=float))


def dimensionality(volumes: bool, spacing: Sequence[float], median_shape: Sequence[float]) -> Choice:
    """(spatial_dims, slice axis or None): 3D for volumes a 3D U-Net can pool, else 2D on slices."""
    if not volumes:
        return Choice((2, None), "the images are 2D")
    ratio = max(spacing) / min(spacing)
    if ratio > ANISOTROPY:
        axis = int(np.argmax(spacing))
        return Choice(
            (2, axis),
            f"2D on slices across axis {axis}: at the target spacing it is {ratio:.3g}x coarser than the finest, "
            f"over {ANISOTROPY:g}x, and medseg's U-Net pools every axis alike, so a 3D patch would run out of "
            "that axis after a pooling or two (nnU-Net would pool it later; its 2D model is as good there)",
        )
    if min(median_shape) < MIN_3D_SIDE:
        axis = int(np.argmin(median_shape))
        return Choice(
            (2, axis),
            f"2D on slices across axis {axis}: the median volume has {median_shape[axis]:.0f} voxels along it, "
            f"under {MIN_3D_SIDE}, too thin for a 3D U-Net to pool twice",
        )
    return Choice((3, None), "3D: the scans are volumes, with no axis over 3x coarser than another")


# --- patch, depth, batch --------------------------------------------------------------------------------------


def depth_for(patch: Sequence[float]) -> int:
    """Poolings until the smallest side of the deepest feature map would drop under 4 voxels (so it is 4-8)."""
    smallest = min(patch)
    return int(min(MAX_DEPTH, max(1, math.floor(math.log2(max(smallest, 1) / BOTTLENECK)))))


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
    """nnU-Net's starting patch: the same physical extent along every axis, 256^3 (3D) or 2048^2 (2D)
    voxels in all, but no larger than the median image along any axis."""
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    voxels = PATCH_VOXELS[len(spacing)]
    sides = inverse * (voxels / np.prod(inverse)) ** (1.0 / len(spacing))
    return [float(min(s, m)) for s, m in zip(sides, median_shape)]


def _round_up(patch: Sequence[float], depth: int) -> list[int]:
    step = 2**depth
    return [int(max(step, math.ceil(p / step) * step)) for p in patch]


def fit_patch(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    memory_of: Callable[[list[int], int], StepMemory],
    budget: int,
) -> tuple[Choice, Choice, StepMemory]:
    """The patch (and depth) to train on: nnU-Net's starting patch, its sides rounded up to a multiple of
    2^depth, shrunk along the axis that is largest relative to the median image until a batch of 2 fits
    the memory budget. ``memory_of(patch, depth)`` is the step memory of the model at that depth."""
    wanted = initial_patch(spacing, median_shape)
    shrunk = 0
    while True:
        depth = depth_for(wanted)
        patch = _round_up(wanted, depth)
        memory = memory_of(patch, depth)
        fits = memory.total(MIN_BATCH) <= budget and math.prod(patch) <= PATCH_VOXELS[3]
        step = 2**depth
        if fits or all(p <= step for p in patch):
            break
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = max((a for a in range(len(patch)) if patch[a] > step), key=lambda a: ratios[a])
        wanted[axis] = patch[axis] - step
        shrunk += 1
    whole = all(p >= m for p, m in zip(patch, median_shape))
    rule = (
        f"the median image at the target spacing is {_x(median_shape)} voxels; "
        + ("the patch covers it whole" if whole else "the patch starts at nnU-Net's 256^3 (3D) / 2048^2 (2D) voxels")
        + f", each side rounded up to a multiple of 2^depth = {2**depth}"
    )
    if shrunk:
        rule += f", then shrunk {shrunk} time(s) along the axis largest relative to the median image"
    rule += (
        f", so that a batch of {MIN_BATCH} takes {memory.total(MIN_BATCH) / 1e9:.3g} GB "
        f"(budget {budget / 1e9:.3g} GB, counted in fp32)"
    )
    if not fits:
        rule += "; even the smallest patch exceeds the budget: raise it (--memory-gb) or expect to run out of memory"
    depth_rule = (
        f"poolings until the smallest side of the deepest feature map is {BOTTLENECK}-{2 * BOTTLENECK} voxels "
        f"({min(patch)} / 2^{depth} = {min(patch) / 2**depth:g}; nnU-Net: {BOTTLENECK}), {depth + 1} resolution levels"
    )
    return Choice(patch, rule), Choice(depth, depth_rule), memory


def batch_size(memory: StepMemory, budget: int, patch: Sequence[int], dataset_voxels: float) -> Choice:
    """As many samples as the memory budget holds, but a batch covers at most 5% of the dataset's voxels
    (more overfits small datasets, as nnU-Net found) and holds at least 2. ``dataset_voxels`` counts as
    nnU-Net does: the median image's voxels (at the target spacing) times the number of cases."""
    by_memory = max(0, (budget - memory.fixed) // max(memory.per_sample, 1))
    by_data = int(round(DATASET_FRACTION * dataset_voxels / math.prod(patch)))
    by_config = min(MAX_BATCH, MAX_BATCH_VOXELS // math.prod(patch))
    batch = max(MIN_BATCH, min(by_memory, by_data, by_config))
    limit = "the 5% of the dataset's voxels" if by_data < by_memory else "the memory budget"
    if batch == MIN_BATCH and min(by_memory, by_data) < MIN_BATCH:
        limit = f"the minimum of {MIN_BATCH}"
    return Choice(
        int(batch),
        f"{limit} sets it: the memory budget holds {by_memory}, 5% of the dataset's {dataset_voxels:.3g} voxels "
        f"holds {by_data} patches, and a batch has at least {MIN_BATCH} (nnU-Net's rule)",
    )


# --- the model --------------------------------------------------------------------------------------------------


def short_budget(minutes: float | None) -> bool:
    """Whether a time budget is short enough for the short-budget recipe (see SHORT_BUDGET_MINUTES)."""
    return minutes is not None and minutes < SHORT_BUDGET_MINUTES


def width(spatial_dims: int, minutes: float | None = None) -> tuple[Choice, Choice]:
    """nnU-Net's widths: 32 features at full resolution, doubling per level, capped; half that
    under a short time budget, where the number of steps limits accuracy more than the width."""
    cap = MAX_FEATURES[spatial_dims]
    if short_budget(minutes):
        first = Choice(
            SHORT_BUDGET_FEATURES,
            f"{SHORT_BUDGET_FEATURES} features at full resolution, doubling at every level: half nnU-Net's 32, "
            f"for a time budget under {SHORT_BUDGET_MINUTES:g} minutes. A step costs about a third of the time, "
            "and on msd_hippocampus_dev it learned as much per step as 32 features (BENCHMARKS.md), so the "
            "budget buys three times the steps",
        )
    else:
        first = Choice(BASE_FEATURES, f"{BASE_FEATURES} features at full resolution, doubling at every level (nnU-Net)")
    return (
        first,
        Choice(
            cap, f"no level wider than {cap} ({spatial_dims}D, nnU-Net): past that, width adds parameters, not accuracy"
        ),
    )


def norm_layer(batch: int) -> Choice:
    """Instance norm for small batches (its statistics are per sample), batch norm from 16 samples on."""
    if batch < BATCH_NORM_FROM:
        return Choice(
            "instance",
            f"instance norm: a batch of {batch} is under {BATCH_NORM_FROM} samples, too few for batch statistics "
            "(Wu & He 2018); instance norm is per sample, as in nnU-Net",
        )
    return Choice("batch", f"batch norm: a batch of {batch} samples gives stable batch statistics")


# --- intensities ------------------------------------------------------------------------------------------------


def normalisation(modalities: Sequence[str], intensity: Sequence[Any]) -> Choice:
    """(intensity, channel_stats): CT channels clipped to the foreground's 0.5/99.5 percentiles and
    z-scored with the foreground's mean and std over the dataset; every other modality z-scored per image."""
    if modalities and all(m == "CT" for m in modalities) and all(s.std > 0 for s in intensity):
        stats = [{"low": s.p00_5, "high": s.p99_5, "mean": s.mean, "std": s.std} for s in intensity]
        return Choice(
            ("dataset_zscore", stats),
            "CT: Hounsfield units mean the same in every scan, so every scan is normalised alike: clipped to the "
            "0.5th-99.5th percentile of the training foreground, then z-scored with its mean and std (nnU-Net)",
        )
    names = ", ".join(m or "unknown" for m in modalities)
    if len(set(modalities)) > 1 and "CT" in modalities:
        why = f"the channels mix modalities ({names}) and medseg normalises all channels one way"
    else:
        why = f"{names}: intensities have no fixed unit, so each image is normalised by its own statistics (nnU-Net)"
    return Choice(("zscore", None), f"z-score per image and channel: {why}")


# --- training ---------------------------------------------------------------------------------------------------


def loss() -> Choice:
    return Choice(
        "dice_ce",
        "Dice + cross-entropy (nnU-Net): cross-entropy for calibrated voxels, Dice so that small classes count",
    )


def recipe(minutes: float | None) -> dict[str, Choice]:
    """nnU-Net's optimiser and schedule, and how long to train; Adam under a short time budget."""
    if short_budget(minutes):
        out = {
            "optimizer": Choice(
                "adam",
                f"Adam, for a time budget under {SHORT_BUDGET_MINUTES:g} minutes: nnU-Net's SGD (momentum 0.99) "
                "is tuned for 250,000 steps, and in a 15 CPU-minute run on msd_hippocampus_dev it predicted only "
                "background for its first 175 steps; Adam passed Dice 0.7 within 150 (BENCHMARKS.md)",
            ),
            "learning_rate": Choice(3e-3, "Adam's initial learning rate for this recipe, decayed by the poly schedule"),
        }
    else:
        out = {
            "optimizer": Choice("sgd", "SGD with Nesterov momentum 0.99, nnU-Net's optimiser for this schedule"),
            "learning_rate": Choice(0.01, "nnU-Net's initial learning rate, decayed by the poly schedule"),
            "momentum": Choice(0.99, "nnU-Net's momentum"),
        }
    out |= {
        "weight_decay": Choice(3e-5, "nnU-Net's weight decay"),
        "schedule": Choice("poly", "lr x (1 - progress)^0.9, reaching 0 at the end of training (nnU-Net)"),
        "grad_clip": Choice(12.0, "gradient norm clipped at 12 (nnU-Net)"),
        "ema_decay": Choice(
            0.998,
            "validate, keep best.pt and predict with a moving average of the weights (mostly the last fifth of the "
            "steps early on, the last ~500 later): a step on a batch of a few patches is noisy, and without the "
            "average one unlucky step can make a class's validation Dice swing between epochs (BENCHMARKS.md, "
            "msd_hippocampus_dev)",
        ),
        "foreground_oversample": Choice(0.33, "a third of the patches centred on a foreground class (nnU-Net)"),
        "epochs": Choice(1000, "nnU-Net trains 1000 epochs of 250 steps; on a CPU set time_budget_minutes"),
        "steps_per_epoch": Choice(250, "nnU-Net's epoch"),
    }
    if minutes:
        out["time_budget_minutes"] = Choice(
            float(minutes), "the time given (--minutes): the poly schedule reaches 0 when it runs out"
        )
    return out


def augmentation(spatial_dims: int) -> dict[str, Choice]:
    """nnU-Net's augmentation ranges in medseg's terms (medseg.augment.ElasticAugment)."""
    degrees = 180.0 if spatial_dims == 2 else 30.0
    how = "any angle in 2D" if spatial_dims == 2 else "about each axis in 3D"
    return {
        "p_elastic": Choice(0.0, "no elastic deformation: nnU-Net found no gain from it, and it is the costliest"),
        "rotate_degrees": Choice(degrees, f"rotations up to {degrees:g} degrees ({how}, nnU-Net)"),
        "p_rotate": Choice(0.2, "nnU-Net rotates a fifth of the samples"),
        "scale": Choice([0.7, 1.4], "zoom 0.7-1.4x (nnU-Net)"),
        "p_scale": Choice(0.2, "nnU-Net zooms a fifth of the samples"),
        "shift": Choice(0.0, "no shift: patches are drawn at random positions already"),
        "p_flip": Choice(
            0.5, "mirrored along each axis with probability 1/2 (nnU-Net), so test-time mirroring is valid"
        ),
        "contrast": Choice(0.25, "contrast x0.75-1.25 (nnU-Net)"),
        "gamma": Choice(0.4, "gamma exp(+-0.4) = 0.67-1.5 (nnU-Net: 0.7-1.5)"),
        "brightness": Choice(0.1, "brightness shifts of up to a tenth of the range (nnU-Net scales it x0.75-1.25)"),
        "p_intensity": Choice(0.15, "each grey-value change on 15% of the samples (nnU-Net)"),
    }


def sliding_window(patch: Sequence[int], batch: int) -> dict[str, Choice]:
    return {
        "roi_size": Choice(list(patch), "windows the size of the training patch: the context the model learned"),
        "overlap": Choice(0.5, "windows overlap by half, blended with a Gaussian (nnU-Net)"),
        "sw_batch_size": Choice(batch, "as many windows a pass as the training batch: inference holds no gradients"),
        "tta": Choice(True, "average over mirrored inputs (nnU-Net); 8 passes in 3D, turn off for speed"),
    }


def split(labelled: int, declared_folds: Sequence[int]) -> Choice:
    """Fold 0 of a 5-fold cross-validation (nnU-Net), the manifest's fixed folds where it has them."""
    if declared_folds:
        folds = len(set(declared_folds))
        return Choice(
            {"mode": "kfold", "folds": folds, "fold": 0},
            f"fold 0 of the {folds} folds data_manifest.csv fixes, so runs compare on the same cases",
        )
    if labelled >= 5:
        return Choice(
            {"mode": "kfold", "folds": 5, "fold": 0, "seed": 12345},
            "fold 0 of a 5-fold cross-validation drawn with nnU-Net's seed 12345",
        )
    return Choice(
        {"mode": "fraction", "val_fraction": 0.2, "seed": 12345},
        f"only {labelled} labelled case(s), too few for 5 folds: one in five validates (none with a single case)",
    )


def class_names(values: Sequence[int]) -> Choice:
    names = {("background" if v == 0 else f"class_{v}"): int(v) for v in values}
    return Choice(
        names,
        f"the label values found in the masks ({', '.join(map(str, values))}); rename the classes freely, keep "
        "the values (a class named background does not count in the mean Dice)",
    )
