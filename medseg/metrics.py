"""Overlap scores per class: Dice, IoU, pixel accuracy.

Convention for a class absent from both prediction and reference: NaN (as nnU-Net and
MONAI), and summaries use nan-aware means, so an empty class neither rewards nor
punishes a case. A class present in only one of the two scores 0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["confusion_counts", "overlap_scores", "mean_scores"]


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
    return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else float("nan") for k in keys}
