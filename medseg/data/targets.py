"""A case's reference as a training target: class indices, and the U-Net paper's weights.

Two steps around preprocessing. ``label_map`` gives the reference (as ``load_case(...,
ids=True)`` loads it) as one channel: class indices, or for an instance case
(``Case.instances``) the object ids, so that resampling (nearest neighbour) carries the ids
into model space.
``training_target`` then makes the target there: for instances, the objects' class
except where two objects touch, which becomes background as in the U-Net paper, so the
network learns to leave a gap between touching objects; and, when asked, the paper's
weight map from the true instances. Keeping ids up to model space means the separation
borders and weights are drawn on the grid the network sees.
"""

from __future__ import annotations

import numpy as np

from medseg.config import Config, DataConfig, instance_class
from medseg.data.weights import border_weight_map, instances_of_class, separate_touching
from medseg.errors import ConfigError, LabelError
from medseg.ingest import Scan

__all__ = ["label_map", "training_target"]


def label_map(label: Scan, instances: bool, data: DataConfig) -> np.ndarray:
    """A loaded reference (``load_case(..., ids=True)``) as the one-channel map preprocessing
    resamples: class indices in the order of ``data.classes``, or for an instance case its
    object ids 1..N (0: background), renumbered densely so float32 preprocessing keeps them exact."""
    from medseg.data.transforms import label_to_index

    if not instances:
        return label_to_index(label.array, list(data.classes.values()), source=str(label.ref.path))
    _objects_class(data)
    ids = label.array
    if ids.size and int(ids.min()) < 0:
        raise LabelError(
            label.ref.path,
            f"instance label map holds negative values (e.g. {int(ids.min())})",
            "an instance map holds 0 for background and a positive id per object",
        )
    _, dense = np.unique(ids, return_inverse=True)
    dense = dense.reshape(ids.shape)
    return (dense if ids.min() == 0 else dense + 1).astype(np.int32)


def training_target(label: np.ndarray, instances: bool, config: Config, with_weights: bool) -> np.ndarray:
    """(T, *spatial) float32 target from a model-space label map (``label_map`` after
    preprocessing): channel 0 the class indices, channel 1 (``with_weights``) the U-Net
    paper's weight map.

    instances: ``label`` holds object ids. The target is then the objects' class, except
    on touching borders (``separate_touching``), which are background; the weights come
    from those separated objects. Without instances, the objects for the weights are the
    connected components of ``train.border_class``.
    """
    names = list(config.data.classes)
    label = np.rint(np.asarray(label)).astype(np.int64)
    if instances:
        objects_index, background_index = _objects_class(config.data)
        objects = separate_touching(label)
        classes = np.where(objects > 0, objects_index, background_index)
    else:
        classes = label
        objects = instances_of_class(classes, names.index(config.train.border_class)) if with_weights else None
    channels = [classes.astype(np.float32)]
    if with_weights:
        t = config.train
        channels.append(border_weight_map(classes, objects, len(names), t.border_w0, t.border_sigma))
    return np.stack(channels)


def _objects_class(data: DataConfig) -> tuple[int, int]:
    """(index of the objects' class, index of background) for instance labels."""
    try:
        name = instance_class(data.classes)
    except ValueError as exc:
        raise ConfigError(f"data.classes: {exc}") from None
    names = list(data.classes)
    background = next(n for n, v in data.classes.items() if v == 0)
    return names.index(name), names.index(background)
