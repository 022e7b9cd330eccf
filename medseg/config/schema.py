"""A whole experiment config: the sections together, and the checks that need more than one of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    field_validator,
)

from medseg.config.sections import (
    MAX_BATCH_VOXELS,
    MAX_NAME_LENGTH,
    MAX_PARAMETERS,
    NAME_PATTERN,
    AugmentConfig,
    ConfigPath,
    DataConfig,
    InferConfig,
    ModelConfig,
    PreprocessConfig,
    Section,
    TrainConfig,
)
from medseg.errors import ConfigError

__all__ = ["Config"]


class Config(Section):
    """A whole experiment: data, model, training, inference, and where results go."""

    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    output_dir: ConfigPath = Path("runs")
    source: Path | None = Field(None, exclude=True, description="the file this config was read from")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        """The name is the run's folder under output_dir, so it must be one plain path component:
        ``../x`` or ``/etc`` would write outside output_dir, a leading dot hides the run."""
        if not 1 <= len(value) <= MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(value) or ".." in value:
            raise ValueError(
                f"not a plain name: use 1 to {MAX_NAME_LENGTH} letters, digits, '_', '-' and "
                "'.', starting with a letter, digit or '_', without '..' or '/' (e.g. unet_em); "
                "set output_dir to choose the folder"
            )
        return value

    def check(self) -> None:
        """Cross-section rules that single fields cannot express."""
        names = list(self.data.classes)
        if self.model.out_channels != len(names):
            raise ValueError(
                f"model.out_channels is {self.model.out_channels} but data.classes names {len(names)} classes"
            )
        if self.train.border_class is not None and self.train.border_class not in names:
            raise ValueError(f"train.border_class {self.train.border_class!r} is not one of data.classes {names}")
        if self.train.loss == "weighted_ce" and self.train.border_class is None:
            raise ValueError(
                "train.loss weighted_ce needs train.border_class (the class whose instances touch, e.g. cell)"
            )
        flip_axes = self.augment.flip_axes
        if flip_axes is not None and (
            len(set(flip_axes)) != len(flip_axes) or any(not 0 <= a < self.model.spatial_dims for a in flip_axes)
        ):
            raise ValueError(
                f"augment.flip_axes {flip_axes}: give distinct spatial axes in 0..{self.model.spatial_dims - 1} "
                f"(0 is the first axis after the channel), or leave it unset to mirror along every axis"
            )
        if self.augment.image_mode == "bicubic" and self.model.spatial_dims == 3:
            raise ValueError(
                "augment.image_mode bicubic needs model.spatial_dims 2 (torch resamples volumes "
                "bilinear only); use image_mode bilinear for a 3D model"
            )
        stats = self.preprocess.channel_stats
        if self.preprocess.intensity == "dataset_zscore" and stats and len(stats) != self.model.in_channels:
            raise ValueError(
                f"preprocess.channel_stats has {len(stats)} entries but model.in_channels is "
                f"{self.model.in_channels}; give one {{low, high, mean, std}} per input channel"
            )
        if len(self.train.patch_size) != self.model.spatial_dims:
            raise ValueError(
                f"train.patch_size {self.train.patch_size} must have "
                f"model.spatial_dims={self.model.spatial_dims} values"
            )
        roi = self.infer.roi_size
        if roi is not None and len(roi) != self.model.spatial_dims:
            raise ValueError(f"infer.roi_size {roi} must have model.spatial_dims={self.model.spatial_dims} values")
        for key, batch, sizes in (
            ("train.batch_size", self.train.batch_size, self.train.patch_size),
            ("infer.sw_batch_size", self.infer.sw_batch_size, roi or self.train.patch_size),
        ):
            if batch * math.prod(sizes) > MAX_BATCH_VOXELS:
                raise ValueError(
                    f"{key} {batch} of size {sizes} is {batch * math.prod(sizes)} voxels a batch, more "
                    f"than {MAX_BATCH_VOXELS} (1 GiB of fp32 per channel); lower {key}"
                )
        self._check_model()

    def _check_model(self) -> None:
        """What only the model knows, learned by building it on PyTorch's meta device (shapes without
        memory, a few ms): that its name and options are valid, that it is not too big to hold, and the
        multiple every patch and window side must be (its ``size_divisor``, which the Predictor checks too),
        so a config that would fail at the first forward pass fails here, naming the key."""
        import torch

        from medseg.models import build_model, list_models, model_options

        name = self.model.name
        if name not in list_models():
            raise ValueError(f"model.name: unknown model {name!r}; available models: {', '.join(list_models())}")
        accepted = model_options(name)
        unknown = [key for key in self.model.options if key not in accepted]
        if unknown:
            raise ValueError(
                f"model.options.{unknown[0]}: not an option of {name}; "
                f"accepted options: {', '.join(accepted) or '(none)'}"
            )
        try:
            with torch.device("meta"):
                net = build_model(self.model)
        except ConfigError as exc:
            raise ValueError(f"model: {exc}") from None
        except (RuntimeError, NotImplementedError):  # a model that cannot live on the meta device: checked when built
            return
        parameters = sum(p.numel() for p in net.parameters())
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"model: {name} with these settings has {parameters:,} parameters "
                f"({parameters * 4 / 2**30:.1f} GiB of fp32 weights), more than {MAX_PARAMETERS:,}; "
                "lower model.features (or the widths in model.options)"
            )
        divisor = int(getattr(net, "size_divisor", 1))
        for key, sizes in (("train.patch_size", self.train.patch_size), ("infer.roi_size", self.infer.roi_size)):
            if sizes is None:
                continue
            if getattr(net, "padding", "same") == "valid":  # an unpadded U-Net has its own size rule
                try:
                    net.output_shape(sizes)
                except ValueError as exc:
                    raise ValueError(f"{key} {sizes}: {exc}") from None
                continue
            bad = [s for s in sizes if s % divisor]
            if bad:
                nearest = ", ".join(
                    f"{s} -> "
                    + " or ".join(map(str, sorted({max(divisor, s // divisor * divisor), -(-s // divisor) * divisor})))
                    for s in sorted(set(bad))
                )
                raise ValueError(
                    f"{key} {sizes}: every size must be a multiple of {divisor} for {name} with these "
                    f"settings (model.depth and the family's poolings set it); nearest: {nearest}"
                )

    @property
    def mirrored_axes(self) -> tuple[int, ...]:
        """The spatial axes training mirrored samples along: the only ones mirroring TTA can trust."""
        augment = self.augment
        if not (augment.enabled and augment.p_flip > 0):
            return ()
        return tuple(range(self.model.spatial_dims)) if augment.flip_axes is None else tuple(augment.flip_axes)

    def dump(self) -> dict[str, Any]:
        """Plain-data form (paths as strings), e.g. to store in a checkpoint."""
        return self.model_dump(mode="json")
