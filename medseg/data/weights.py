"""The U-Net paper's pixel weight map for touching objects (Ronneberger et al. 2015, eq. 2).

w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), where d1 and d2 are the
distances to the nearest and second-nearest object instance and w_c balances class
frequencies. Thin gaps between touching cells get large weights, so the network learns
to separate them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["border_weight_map"]


def border_weight_map(
    label: np.ndarray,
    instance_class: int,
    num_classes: int,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> np.ndarray:
    """Weight map (float32, same shape as ``label``) from a class-index label map.

    Instances are the connected components of ``instance_class`` (for ISBI EM: the cells,
    separated by membrane). Distances are in pixels.
    """
    label = np.asarray(label)
    counts = np.bincount(label.reshape(-1), minlength=num_classes).astype(np.float64)
    present = counts > 0
    balance = np.zeros(num_classes)
    balance[present] = counts.sum() / (present.sum() * counts[present])
    balance /= balance[present].min()  # the most frequent class weighs 1
    weights = balance[label].astype(np.float32)
    instances, n = ndimage.label(label == instance_class)
    if n >= 2:
        # Beyond d1 + d2 = 6 sigma the term is < 2e-8 * w0: each instance's distances are
        # only needed within that reach of it, which makes this ~10x faster on EM slices.
        reach = int(np.ceil(6 * sigma)) + 1
        nearest = np.full(label.shape, np.inf)
        second = np.full(label.shape, np.inf)
        for i, box in enumerate(ndimage.find_objects(instances), start=1):
            if box is None:
                continue
            window = tuple(
                slice(max(b.start - reach, 0), min(b.stop + reach, size)) for b, size in zip(box, label.shape)
            )
            d = ndimage.distance_transform_edt(instances[window] != i)
            near, sec = nearest[window], second[window]
            closer = d < near
            second[window] = np.where(closer, near, np.minimum(sec, d))
            nearest[window] = np.where(closer, d, near)
        border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
        weights += np.where(instances == 0, border, 0.0).astype(np.float32)
    return weights
