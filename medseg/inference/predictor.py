"""Predictor: load a checkpoint once, then segment scan after scan.

The checkpoint rebuilds the model and the exact preprocessing it was trained with.
Sliding-window inference runs through MONAI's inferer (Gaussian blending, configurable
overlap and window batch), with stitching on the CPU so a large volume does not need
its logits on the GPU; the argmax is taken in model space, and only the small integer
label map is resampled back to the scan's own grid.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from medseg.training.checkpoint import load_checkpoint
from medseg.config import Config
from medseg.device import choose_device, choose_precision, in_precision
from medseg.errors import ConfigError, ScanError
from medseg.files import sha256_file
from medseg.ingest.scan import Scan
from medseg.data.transforms import Preprocessor, index_to_label

log = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "inference_settings"]


def inference_settings(
    config: Config,
    overlap: float | None = None,
    roi_size: Sequence[int] | None = None,
    precision: str | None = None,
    keep_largest: Sequence[str] = (),
    fill_holes: Sequence[str] = (),
) -> dict[str, Any]:
    """The settings besides the weights and mirroring that shape a mask, resolved against the
    checkpoint's ``infer`` section as `Predictor` resolves them. They are part of a scan's skip
    key (medseg.pipeline.ledger): a rerun with another overlap, window, precision or
    post-processing redoes its masks instead of calling the old ones up to date."""
    infer = config.infer
    return {
        "overlap": float(infer.overlap if overlap is None else overlap),
        "roi_size": [int(r) for r in (roi_size or infer.roi_size or config.train.patch_size)],
        "precision": precision or infer.precision,
        "keep_largest": sorted(keep_largest),
        "fill_holes": sorted(fill_holes),
    }


@dataclass
class Prediction:
    """A label map on the scan's grid (label values as configured) and, if asked, probabilities."""

    mask: np.ndarray  # (*scan spatial shape), integer label values
    probabilities: np.ndarray | None = None  # (classes, *scan spatial shape), float16


class Predictor:
    """Segments scans with one trained model.

    Args:
        checkpoint: a run folder (best.pt is used) or a checkpoint file.
        device: 'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'.
        tta: average the softmax over every mirroring of the axes the model was trained
            mirrored along (``augment.flip_axes``), or of every axis if it never was.
        precision: 'auto', 'fp32', 'bf16' or 'fp16' (see ``InferConfig``); None keeps the checkpoint's.
        overlap, sw_batch_size, roi_size: override the checkpoint's inference settings.
        keep_largest: class names whose mask keeps only its largest connected component.
        fill_holes: class names whose mask has its holes filled.
        memory_budget_mb: the most one scan may take in model space (MB); None: the default
            of ``medseg.ingest.budget`` (a quarter of the available memory, at most 4 GB).

    Example::

        predictor = Predictor("runs/unet_em")
        for ref in discover("scans").scans:
            prediction = predictor.predict(load(ref))
    """

    def __init__(
        self,
        checkpoint: Path | str,
        device: str = "auto",
        tta: bool | None = None,
        precision: str | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        roi_size: Sequence[int] | None = None,
        keep_largest: Sequence[str] = (),
        fill_holes: Sequence[str] = (),
        memory_budget_mb: float | None = None,
    ) -> None:
        state = load_checkpoint(checkpoint)
        self.checkpoint_path = Path(checkpoint)
        self.checkpoint_file: Path = state.path or Path(checkpoint)
        self.memory_budget_mb = memory_budget_mb
        self.config: Config = state.config
        self.classes: dict[str, int] = state.classes
        self.device = choose_device(device)
        self.model = state.build_model()
        self.model.to(self.device).eval()
        self.preprocessor = Preprocessor(self.config.preprocess)
        infer = self.config.infer
        self.tta = infer.tta if tta is None else tta
        # TTA mirrors only along the axes training mirrored along (the axes nnU-Net mirrors); a
        # model that never saw a mirrored sample is mirrored along every axis, as asked, with a warning.
        trained_axes = self.config.mirrored_axes
        self.tta_axes = trained_axes or tuple(range(self.spatial_dims))
        if self.tta and not trained_axes:
            log.warning(
                "%s: test-time augmentation mirrors every scan, but this model never saw a mirrored sample "
                "in training (augment.p_flip 0, augment.flip_axes empty or augment off), so mirroring can "
                "cost accuracy (the EM configs lose about 0.002 pixel error, BENCHMARKS.md); predict without --tta, "
                "or train with augment.p_flip above 0",
                checkpoint,
            )
        self.settings = inference_settings(self.config, overlap, roi_size, precision, keep_largest, fill_holes)
        self.dtype = choose_precision(self.settings["precision"], self.device)
        self.overlap = self.settings["overlap"]
        self.sw_batch_size = sw_batch_size or infer.sw_batch_size
        self.roi_size = self.settings["roi_size"]
        divisor = int(getattr(self.model, "size_divisor", 1))
        bad = [r for r in self.roi_size if r % divisor]
        if bad:
            raise ConfigError(
                f"infer.roi_size {self.roi_size}: every size must be a multiple of {divisor} "
                f"for {self.config.model.name}"
            )
        unknown = [c for c in [*keep_largest, *fill_holes] if c not in self.classes]
        if unknown:
            raise ConfigError(f"post-processing names unknown classes {unknown}; classes are {list(self.classes)}")
        self.keep_largest = [list(self.classes).index(c) for c in keep_largest]
        self.fill_holes = [list(self.classes).index(c) for c in fill_holes]

    @property
    def spatial_dims(self) -> int:
        return self.config.model.spatial_dims

    def _window_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (1, K, *spatial) for one (1, C, *spatial) input, stitched on CPU."""
        flips: list[tuple[int, ...]] = [()]
        if self.tta:
            axes = tuple(2 + a for a in self.tta_axes)
            flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
        predictor = in_precision(self.model, self.device, self.dtype)
        total = None
        for dims in flips:
            x = torch.flip(image, dims) if dims else image
            with torch.no_grad():
                logits = sliding_window_inference(
                    x,
                    roi_size=self.roi_size,
                    sw_batch_size=self.sw_batch_size,
                    predictor=predictor,
                    overlap=self.overlap,
                    mode="gaussian",
                    sigma_scale=0.125,
                    sw_device=self.device,
                    device=torch.device("cpu"),
                )
            probs = torch.softmax(logits, dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total / len(flips)

    @functools.cached_property
    def checkpoint_sha256(self) -> str:
        """The checkpoint file's sha256: the model's part of the skip rule's key (`medseg.pipeline.ledger`)."""
        return sha256_file(self.checkpoint_file)

    @property
    def checkpoint_files(self) -> tuple[Path, ...]:
        """The checkpoint files whose models make the masks (one here; an Ensemble has several)."""
        return (self.checkpoint_file,)

    def predict(self, scan: Scan, probabilities: bool = False) -> Prediction:
        """Segment one scan; the mask comes back on the scan's own grid."""
        data = self.prepare(scan)
        return self.finish(self.model_probabilities(data), data, probabilities)

    def prepare(self, scan: Scan, extra_maps: int = 0) -> dict[str, Any]:
        """Check the scan against the model and its memory budget, then preprocess it into model space.

        extra_maps: class-probability maps the caller holds beside ours (an ensemble's running sum),
        counted in the budget so a scan that fits one model but not the ensemble is refused up front.
        """
        if scan.channels != self.config.model.in_channels:
            raise ScanError(
                scan.ref.path,
                f"has {scan.channels} channel(s) but the model takes {self.config.model.in_channels}",
                "load it with the colour setting used in training (data.color) or use a matching model",
            )
        spatial = scan.array.ndim - 1
        if not (spatial == self.spatial_dims or (spatial == 3 and self.spatial_dims == 2)):
            raise ScanError(
                scan.ref.path,
                f"has {spatial} spatial axes; a {self.spatial_dims}D model cannot segment it",
                "use a 2D model for images",
            )
        # input, running probability sum, one softmax pass and the stitched logits, all float32
        maps = 3 * len(self.classes) + extra_maps
        self.preprocessor.check_budget(scan, 4 * (scan.channels + maps), self.memory_budget_mb)
        return self.preprocessor(scan)

    def model_probabilities(self, data: dict[str, Any]) -> torch.Tensor:
        """Softmax probabilities (K, *model-space spatial) of a preprocessed scan (from `prepare`)."""
        image = torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32)
        spatial = image.ndim - 1
        if spatial == self.spatial_dims:
            return self._window_logits(image[None])[0]
        # a volume through a 2D model, plane by plane (`prepare` refused every other combination)
        axis = self.config.train.slice_dim
        planes = [self._window_logits(image.select(axis, k)[None])[0] for k in range(image.shape[axis])]
        return torch.stack(planes, dim=axis)

    def finish(self, probs: torch.Tensor, data: dict[str, Any], probabilities: bool = False) -> Prediction:
        """Argmax and post-processing in model space, then the label map (and probabilities) on the scan's grid."""
        index = probs.argmax(0).to(torch.uint8).numpy()
        index = self._postprocess(index)
        back = Preprocessor.invert(torch.as_tensor(index[None]), data)[0]
        mask = index_to_label(np.rint(back).astype(np.int64), list(self.classes.values()))
        prob_map = None
        if probabilities:
            prob_map = np.stack([Preprocessor.invert(p[None], data)[0] for p in probs]).astype(np.float16)
        return Prediction(mask=mask, probabilities=prob_map)

    def _postprocess(self, index: np.ndarray) -> np.ndarray:
        for cls in self.keep_largest:
            components, n = ndimage.label(index == cls)
            if n > 1:
                sizes = ndimage.sum_labels(np.ones_like(components), components, range(1, n + 1))
                keep = int(np.argmax(sizes)) + 1
                index[(components > 0) & (components != keep)] = 0
        for cls in self.fill_holes:
            filled = ndimage.binary_fill_holes(index == cls)
            index[filled] = cls
        return index
