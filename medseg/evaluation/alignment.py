"""How far labels sit from the structures they mark: a systematic offset of a reference, in pixels.

Why: a reference drawn a fraction of a pixel off its structures in a fixed direction caps
every model's score and makes mirror augmentation cost accuracy (a mirror turns the offset
around). The measure is the correlation between the labels, moved by whole pixels, and an
image feature that marks the same structures (e.g. the darkness of EM membranes); the peak
is placed between whole shifts by a parabola through the best shift and its neighbours, so
no interpolation smooths one shift more than another. bench/label_offset.py reports it for ISBI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["parabolic_peak", "shifted_correlation"]


def shifted_correlation(feature: np.ndarray, labels: np.ndarray, axis: int, shift: int, margin: int = 3) -> float:
    """Pearson correlation of ``feature`` with ``labels`` moved by ``shift`` pixels along ``axis``
    (positive: towards higher indices), both cropped by ``margin`` (at least ``|shift|``) so no pixel wraps."""
    if margin < abs(shift) or margin < 1:
        raise ValueError(f"margin {margin} must be at least 1 and at least the shift {shift}")
    moved = np.roll(labels, shift, axis=axis)
    inner = tuple(slice(margin, -margin) for _ in range(feature.ndim))
    return float(np.corrcoef(feature[inner].ravel(), moved[inner].ravel())[0, 1])


def parabolic_peak(shifts: Sequence[int], values: Sequence[float]) -> float:
    """Sub-pixel position of the maximum, from the best whole shift and its neighbours (an end stays put)."""
    best = int(np.argmax(values))
    if best in (0, len(values) - 1):
        return float(shifts[best])
    left, centre, right = values[best - 1], values[best], values[best + 1]
    return shifts[best] + 0.5 * (left - right) / (left - 2 * centre + right)
