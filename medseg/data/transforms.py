"""Preprocessing shared by training and inference, and its exact inverse.

The pipeline is MONAI dict transforms over ``image``/``label`` keys. Geometric steps
(orientation, spacing) are invertible and record what they did on the MetaTensor, so a
prediction goes back to the scan's own grid with ``Invertd`` (nearest neighbour for label
maps), never with hand-written inverse maths. The config of the pipeline is stored in
every checkpoint, so inference rebuilds exactly what training used.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medseg.config import ChannelStats, PreprocessConfig
from medseg.errors import LabelError
from medseg.ingest.scan import Scan

__all__ = ["ClipZScored", "Preprocessor", "label_to_index", "index_to_label", "to_meta_tensor"]


def to_meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """A channel-first array with its voxel→RAS affine, as MONAI expects."""
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine, dtype=torch.float64))


def label_to_index(label: np.ndarray, values: Sequence[int], source: str = "label") -> np.ndarray:
    """Map label values (e.g. 0 and 255) to class indices 0..K-1 in the order of ``values``."""
    out = np.full(label.shape, -1, dtype=np.int64)
    for index, value in enumerate(values):
        out[label == value] = index
    if (out < 0).any():
        extra = sorted(set(np.unique(label[out < 0]).tolist()))
        raise LabelError(
            source,
            f"label values {extra[:10]} are not among the configured classes {list(values)}",
            "add them to data.classes or fix the mask",
        )
    return out


def index_to_label(index: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Class indices back to the label values the user configured (smallest dtype that fits)."""
    lut = np.asarray(values)
    dtype = np.uint8 if lut.min() >= 0 and lut.max() <= 255 else np.int32
    return lut.astype(dtype)[index]


class ClipZScored(MapTransform):
    """Clip each channel to fixed [low, high], then z-score it with a fixed mean and std (per channel).

    nnU-Net's CT normalisation: CT intensities mean the same in every scan (Hounsfield
    units), so one set of statistics, measured over the foreground of the whole training
    set, normalises them all, and the clip keeps air and metal from dominating. MONAI's
    transforms clip either by each image's own percentiles or to one range for every
    channel, so the per-channel clip is done here, in one broadcast ``clamp``; the
    MetaTensor's metadata (and its record of geometric steps) passes through.
    """

    def __init__(self, keys: str | Sequence[str], stats: Sequence[ChannelStats]) -> None:
        super().__init__(keys)
        self.low = torch.tensor([s.low for s in stats], dtype=torch.float32)
        self.high = torch.tensor([s.high for s in stats], dtype=torch.float32)
        self.mean = torch.tensor([s.mean for s in stats], dtype=torch.float32)
        self.std = torch.tensor([s.std for s in stats], dtype=torch.float32)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if image.shape[0] != len(self.mean):
                raise ValueError(f"{key} has {image.shape[0]} channel(s) but {len(self.mean)} channel_stats are given")
            shape = (-1,) + (1,) * (image.ndim - 1)
            low, high = self.low.view(shape).to(image.device), self.high.view(shape).to(image.device)
            mean, std = self.mean.view(shape).to(image.device), self.std.view(shape).to(image.device)
            out[key] = (torch.clamp(image, low, high) - mean) / std
        return out


class Preprocessor:
    """Scan → model-space tensor, and model-space label map → the scan's own grid.

    Volumes (3 spatial axes with physical spacing) are reoriented and resampled when the
    config asks for it; 2D images and stacks without a physical pixel size keep their grid.
    """

    def __init__(self, config: PreprocessConfig | Mapping[str, Any]) -> None:
        self.config = config if isinstance(config, PreprocessConfig) else PreprocessConfig.model_validate(config)

    def _geometric(self, keys: Sequence[str], modes: Sequence[str], volume: bool) -> list:
        cfg = self.config
        steps: list = []
        if not volume:
            return steps
        if cfg.orientation:
            steps.append(Orientationd(keys=list(keys), axcodes=cfg.orientation, labels=None))
        if cfg.spacing:
            steps.append(Spacingd(keys=list(keys), pixdim=cfg.spacing, mode=list(modes), dtype=np.float32))
        return steps

    def _intensity(self) -> list:
        cfg = self.config
        if cfg.intensity == "zscore":
            return [NormalizeIntensityd(keys="image", channel_wise=True)]
        if cfg.intensity == "dataset_zscore":
            return [ClipZScored(keys="image", stats=cfg.channel_stats or [])]
        if cfg.intensity == "percentile":
            low, high = cfg.percentiles
            return [
                ScaleIntensityRangePercentilesd(
                    keys="image", lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
                )
            ]
        if cfg.intensity == "ct_window":
            low, high = cfg.window
            return [ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)]
        return []

    @staticmethod
    def _is_volume(scan: Scan) -> bool:
        return scan.geometry.ndim == 3 and scan.geometry.spacing_known

    def check_budget(self, scan: Scan, bytes_per_voxel: int, budget_mb: float | None = None) -> None:
        """Refuse (BudgetError) a scan whose model-space grid would not fit the memory budget, before resampling.

        A header claiming 100 mm voxels for a model trained at 1 mm multiplies the voxel
        count a million times; MONAI would resample for minutes or die inside.
        """
        from medseg.ingest.budget import check_resample_budget

        if self._is_volume(scan) and self.config.spacing:
            check_resample_budget(
                scan.ref.path,
                scan.geometry,
                self.config.spacing,
                orientation=self.config.orientation,
                bytes_per_voxel=bytes_per_voxel,
                budget=budget_mb,
            )

    def pipeline(self, scan: Scan, with_label: bool) -> Compose:
        keys, modes = (["image", "label"], ["bilinear", "nearest"]) if with_label else (["image"], ["bilinear"])
        return Compose(self._geometric(keys, modes, self._is_volume(scan)) + self._intensity())

    def __call__(self, scan: Scan, label: np.ndarray | None = None) -> dict[str, Any]:
        """Preprocess a scan (and optionally its label index map, shape (1, *spatial)).

        Returns a dict with 'image' (float32 MetaTensor) and 'label', plus 'transform',
        the Compose to hand to ``invert``.
        """
        data: dict[str, Any] = {
            "image": to_meta_tensor(scan.array.astype(np.float32, copy=False), scan.geometry.affine)
        }
        if label is not None:
            data["label"] = to_meta_tensor(label.astype(np.float32, copy=False), scan.geometry.affine)
        transform = self.pipeline(scan, with_label=label is not None)
        out = transform(data)
        out["transform"] = transform
        return out

    @staticmethod
    def invert(prediction: torch.Tensor, preprocessed: Mapping[str, Any]) -> np.ndarray:
        """A (C, *model_space) label map or probabilities → the scan's grid (nearest neighbour)."""
        image = preprocessed["image"]
        if not image.applied_operations:  # nothing geometric was done: already on the scan's grid
            return np.asarray(torch.as_tensor(prediction).detach().cpu())
        pred = MetaTensor(torch.as_tensor(prediction), meta=dict(image.meta))
        pred.applied_operations = list(image.applied_operations)
        data = {"image": image, "pred": pred}
        inverted = Invertd(keys="pred", transform=preprocessed["transform"], orig_keys="image", nearest_interp=True)(
            data
        )
        return np.asarray(inverted["pred"].detach().cpu())
