"""Scores per class: Dice, IoU, pixel accuracy, HD95 and surface Dice; their summaries.

Convention for a class absent from both prediction and reference: NaN (as nnU-Net and
MONAI), and summaries use nan-aware means, so an empty class neither rewards nor
punishes a case. A class present in only one of the two scores 0 (Dice, IoU, surface
Dice) and HD95 = inf: a missed or invented structure is the worst boundary error there
is, and a NaN would let it drop out of a nan-aware mean (MONAI returns NaN there;
DeepMind's surface-distance package returns inf).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "confusion_counts",
    "overlap_scores",
    "mean_scores",
    "class_overlap",
    "pixel_accuracy",
    "hausdorff95",
    "surface_dice",
    "summarize",
    "ISBI_THRESHOLDS",
    "isbi_counts",
    "isbi_pixel_error",
]


def confusion_counts(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: rows are reference classes, columns predicted."""
    p = torch.as_tensor(pred).reshape(-1).long()
    r = torch.as_tensor(ref).reshape(-1).long()
    if p.shape != r.shape:
        raise ValueError(f"prediction has {p.numel()} voxels, reference {r.numel()}")
    counts = torch.bincount(r * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def overlap_scores(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Dice and IoU per class plus pixel accuracy/error from a confusion matrix."""
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    scores: dict[str, float] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    for i, name in enumerate(class_names):
        scores[f"dice_{name}"] = float(dice[i])
        scores[f"iou_{name}"] = float(iou[i])
    structures = [i for i, name in enumerate(class_names) if name != "background"]
    scores["mean_dice"] = float(np.nanmean(dice[structures])) if np.isfinite(dice[structures]).any() else float("nan")
    total = counts.sum()
    scores["pixel_accuracy"] = float(tp.sum() / total) if total else float("nan")
    scores["pixel_error"] = 1.0 - scores["pixel_accuracy"] if total else float("nan")
    return scores


def mean_scores(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """nan-aware mean of each score over cases."""
    keys = rows[0].keys() if rows else []
    return {
        k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else float("nan")
        for k in keys
    }


def class_overlap(pred: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> dict[int, tuple[float, float]]:
    """(Dice, IoU) of each class value, for masks holding arbitrary values (0/255 too)."""
    p, r = _same_shape(pred, ref)
    scores: dict[int, tuple[float, float]] = {}
    for value in values:
        in_pred, in_ref = p == value, r == value
        tp = int(np.count_nonzero(in_pred & in_ref))
        union = int(np.count_nonzero(in_pred)) + int(np.count_nonzero(in_ref)) - tp
        if union == 0:
            scores[int(value)] = (float("nan"), float("nan"))
        else:
            scores[int(value)] = (2 * tp / (union + tp), tp / union)
    return scores


def pixel_accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of voxels whose predicted value equals the reference value."""
    p, r = _same_shape(pred, ref)
    return float(np.count_nonzero(p == r) / p.size) if p.size else float("nan")


def hausdorff95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks, in spacing units.

    NaN when both masks are empty, inf when only one is (see the module docstring).
    """
    empty = _empty_case(pred_mask, ref_mask)
    if empty is not None:
        return float("nan") if empty == "both" else float("inf")
    from monai.metrics import compute_hausdorff_distance

    p, r, steps = _surface_inputs(pred_mask, ref_mask, spacing)
    with _quiet_monai():
        value = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=steps)
    return float(value.reshape(-1)[0])


def surface_dice(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalised surface Dice: share of both boundaries within ``tolerance`` of the other.

    NaN when both masks are empty, 0 when only one is (as MONAI).
    """
    empty = _empty_case(pred_mask, ref_mask)
    if empty is not None:
        return float("nan") if empty == "both" else 0.0
    from monai.metrics import compute_surface_dice

    p, r, steps = _surface_inputs(pred_mask, ref_mask, spacing)
    with _quiet_monai():
        value = compute_surface_dice(p, r, [float(tolerance)], include_background=True, spacing=steps)
    return float(value.reshape(-1)[0])


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, std (population), median and n over the values that are not NaN.

    An inf (HD95 of a missed structure) makes the mean inf and the std NaN; the median
    stays informative.
    """
    data = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    if not data.size:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    finite = bool(np.isfinite(data).all())
    return {
        "mean": float(np.mean(data)),
        "std": float(np.std(data)) if finite else float("nan"),
        "median": float(np.median(data)),
        "n": int(data.size),
    }


def _same_shape(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction has shape {p.shape}, reference {r.shape}")
    return p, r


def _empty_case(pred_mask: np.ndarray, ref_mask: np.ndarray) -> str | None:
    in_pred, in_ref = bool(np.any(pred_mask)), bool(np.any(ref_mask))
    if in_pred and in_ref:
        return None
    return "both" if not (in_pred or in_ref) else "one"


def _surface_inputs(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Batch-first one-channel tensors for MONAI, without single-voxel axes.

    A 2D mask stored as (X, Y, 1) would otherwise count every pixel as boundary, since
    MONAI finds edges by 3D erosion.
    """
    p, r = _same_shape(pred_mask, ref_mask)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not fit a mask of shape {p.shape}")
    keep = [axis for axis, size in enumerate(p.shape) if size > 1]
    if len(keep) >= 2 and len(keep) < p.ndim:
        p, r = p.squeeze(), r.squeeze()
        spacing = [spacing[axis] for axis in keep]
    batched = [torch.as_tensor(np.ascontiguousarray(m, dtype=bool))[None, None] for m in (p, r)]
    return batched[0], batched[1], [float(s) for s in spacing]


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """Silence MONAI's deprecation notice about an argument it passes to itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        yield


# The challenge's thresholds for its pixel error: 0.0 to 1.0 in steps of 0.1.
ISBI_THRESHOLDS = np.linspace(0.0, 1.0, 11)


def isbi_counts(foreground_probability: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """True positives, false positives and false negatives at each of ISBI_THRESHOLDS,
    as the ISBI 2012 challenge counts them: reference pixels above 0 (cell interiors) are
    positive, and the proposal is positive where its probability exceeds the threshold.
    A hard mask is a probability of 0 or 1: every threshold below 1 then gives its counts."""
    truth = reference > 0
    rows = []
    for threshold in ISBI_THRESHOLDS:
        proposed = foreground_probability > threshold
        rows.append([(proposed & truth).sum(), (proposed & ~truth).sum(), (~proposed & truth).sum()])
    return np.asarray(rows, dtype=np.float64)


def isbi_pixel_error(counts: np.ndarray) -> tuple[float, float]:
    """The ISBI 2012 challenge's "pixel error", the figure the U-Net paper reports (0.0611):
    1 - the maximal F-score of pixel similarity over thresholds, from counts pooled over all
    slices. It is not the misclassified fraction that ``pixel_error`` is: it divides the
    wrong pixels by the cell pixels of reference and proposal together, not by all pixels
    once, so on these slices, where four in five pixels are cell, it comes out near 0.6
    times the misclassified fraction.
    Returns the error and the threshold that gives it."""
    tp, fp, fn = counts.T
    f_score = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    best = int(np.argmax(f_score))
    return float(1.0 - f_score[best]), float(ISBI_THRESHOLDS[best])
