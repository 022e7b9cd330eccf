"""The U-Net paper's pixel weight map and its separation of touching objects (Ronneberger et al. 2015).

w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), where d1 and d2 are the
distances to the nearest and second-nearest object instance and w_c balances class
frequencies (eq. 2). Thin gaps between touching cells get large weights, so the network
learns to separate them. The paper computes the weights from the true instances and sets
the pixels where two instances touch to background in the target ("separation border");
``separate_touching`` does that, ``border_weight_map`` then weighs the gaps it leaves.

Where no instance map exists (ISBI EM: cells separated by membrane), ``instances_of_class``
stands in: the connected components of one class. For touching objects that is wrong by
construction (two touching nuclei form one component), which is why instance layouts carry
their true instance ids (``medseg.ingest.labels.load_instance_masks``).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

__all__ = ["border_weight_map", "instances_of_class", "separate_touching", "touching_border", "touching_pairs"]


def instances_of_class(label: np.ndarray, instance_class: int) -> np.ndarray:
    """Connected components (face connectivity: a one-pixel diagonal membrane still separates
    two cells) of one class of a class-index map, as instance ids 1..N."""
    instances, _ = ndimage.label(np.asarray(label) == instance_class)
    return instances


def touching_border(instances: np.ndarray) -> np.ndarray:
    """Pixels of an instance that have a pixel of another instance among their 3^n neighbours.

    Removing them leaves no pixel of one instance adjacent (even diagonally) to a pixel of
    another, so touching instances fall into different connected components of the foreground.
    """
    instances = np.asarray(instances)
    if not instances.size:
        return np.zeros(instances.shape, dtype=bool)
    inside = instances > 0
    above = int(instances.max()) + 1
    larger = ndimage.maximum_filter(instances, size=3, mode="constant", cval=0) > instances
    filled = np.where(inside, instances, above)  # background never counts as a smaller neighbour
    smaller = ndimage.minimum_filter(filled, size=3, mode="constant", cval=above) < instances
    return inside & (larger | smaller)


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """The instance map with every touching border pixel (``touching_border``) set to background (0)."""
    instances = np.asarray(instances)
    return np.where(touching_border(instances), 0, instances).astype(instances.dtype, copy=False)


def touching_pairs(instances: np.ndarray) -> np.ndarray:
    """(K, 2) array of the id pairs (a < b) of instances with 3^n-adjacent pixels, sorted."""
    instances = np.asarray(instances)
    found: list[np.ndarray] = []
    # Half of the neighbourhood's offsets suffice: the other half gives the same pairs mirrored.
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=instances.ndim) if o > (0,) * instances.ndim]
    for offset in offsets:
        here = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in zip(offset, instances.shape))
        there = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in zip(offset, instances.shape))
        a, b = instances[here].reshape(-1), instances[there].reshape(-1)
        touching = (a > 0) & (b > 0) & (a != b)
        if touching.any():
            found.append(np.stack([np.minimum(a[touching], b[touching]), np.maximum(a[touching], b[touching])], 1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def border_weight_map(
    label: np.ndarray,
    instances: np.ndarray,
    num_classes: int,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> np.ndarray:
    """Weight map (float32, ``label``'s shape) from a class-index map and its instance map.

    label: class indices 0..num_classes-1 (the training target), which sets w_c, the class
    balance: each class weighs the inverse of its frequency, scaled so the most frequent
    weighs 1. instances: instance ids (0: no instance) on the same grid, e.g. from
    ``separate_touching`` or ``instances_of_class``. The border term is added on pixels that
    belong to no instance; d1 and d2 are Euclidean distances in pixels.
    """
    label, instances = np.asarray(label), np.asarray(instances)
    if label.shape != instances.shape:
        raise ValueError(f"label {label.shape} and instances {instances.shape} must share one grid")
    if instances.size and instances.min() < 0:
        raise ValueError("instance ids must be 0 (no instance) or positive")
    counts = np.bincount(label.reshape(-1), minlength=num_classes).astype(np.float64)
    present = counts > 0
    balance = np.zeros(num_classes)
    balance[present] = counts.sum() / (present.sum() * counts[present])
    balance /= balance[present].min()  # the most frequent class weighs 1
    weights = balance[label].astype(np.float32)
    ids, compact = np.unique(instances, return_inverse=True)  # any id values -> 0..n (0 stays 0 when present)
    compact = compact.reshape(instances.shape)
    if ids[0] != 0:
        compact = compact + 1
    if len(ids) - (ids[0] == 0) < 2:
        return weights
    # Beyond d1 + d2 = 6 sigma the term is < 2e-8 * w0: each instance's distances are
    # only needed within that reach of it, so each transform runs on a window around the
    # instance instead of the whole image (on 100 nuclei in 512 x 512: see BENCHMARKS.md).
    reach = int(np.ceil(6 * sigma)) + 1
    nearest = np.full(label.shape, np.inf)
    second = np.full(label.shape, np.inf)
    for i, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        window = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, size)) for b, size in zip(box, label.shape))
        d = ndimage.distance_transform_edt(compact[window] != i)
        near, sec = nearest[window], second[window]
        closer = d < near
        second[window] = np.where(closer, near, np.minimum(sec, d))
        nearest[window] = np.where(closer, d, near)
    border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    weights += np.where(compact == 0, border, 0.0).astype(np.float32)
    return weights
