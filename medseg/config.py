"""Experiment configs: YAML validated by pydantic, with dotted overrides.

A config is data: every section forbids unknown keys, so a typo is an error that names
the file and the dotted key instead of a silently ignored setting. Relative paths in a
config resolve against the config file's folder, so a config works from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medseg.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "SplitConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "AugmentConfig",
    "InferConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(Section):
    """How cases divide into training and validation.

    manifest: the split column of data_manifest.csv; cases: explicit lists;
    fraction: a seeded random validation fraction; kfold: fold ``fold`` of ``folds``.
    """

    mode: Literal["manifest", "cases", "fraction", "kfold"] = "manifest"
    train: list[str] | None = None
    val: list[str] | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.mode == "cases" and not self.train:
            raise ValueError("mode 'cases' needs a 'train' list of case ids")
        if self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} does not exist with folds={self.folds} (folds are 0..{self.folds - 1})")
        return self


class CodeConfig(Section):
    """One coded concept, as a DICOM code sequence item: e.g. value 10200004, scheme SCT, meaning Liver."""

    value: str = Field(max_length=64)
    scheme: str = Field(max_length=16)
    meaning: str = Field(max_length=64)

    @field_validator("value", "scheme", "meaning")
    @classmethod
    def _dicom_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (e.g. value: '10200004', scheme: SCT, meaning: Liver)")
        if any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("a DICOM code may not contain a backslash or control characters")
        return value.strip()


class ClassCodingConfig(Section):
    """How one class is coded in a DICOM SEG: category (DICOM CID 7150), type (CID 7151),
    and an optional type modifier such as laterality (SCT 7771000 Left)."""

    category: CodeConfig
    type: CodeConfig
    modifier: CodeConfig | None = None


class DataConfig(Section):
    """Where the cases come from and what their label values mean.

    Exactly one source: a manifest ``dataset`` id, an ``images`` folder (with a
    ``labels`` folder paired by case name), or a ``csv`` of image,label paths.
    """

    dataset: str | None = None
    root: ConfigPath | None = None
    images: ConfigPath | None = None
    labels: ConfigPath | None = None
    csv: ConfigPath | None = None
    classes: dict[str, int] = Field(default_factory=lambda: {"background": 0, "foreground": 1})
    color: Literal["grey", "channels"] = "grey"
    split: SplitConfig = Field(default_factory=SplitConfig)
    # DICOM SEG codes per class name, over medseg.seg_coding's SNOMED CT table (e.g. for site-specific classes).
    classes_coding: dict[str, ClassCodingConfig] | None = None

    @model_validator(mode="after")
    def _coded_classes_exist(self) -> DataConfig:
        unknown = sorted(set(self.classes_coding or {}) - set(self.classes))
        if unknown:
            raise ValueError(f"classes_coding names {unknown}, which are not in classes {list(self.classes)}; "
                             "use the class names exactly as data.classes spells them")
        return self

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: dict[str, int]) -> dict[str, int]:
        if len(value) < 2:
            raise ValueError("at least two classes are needed (e.g. background and one structure)")
        values = list(value.values())
        if len(set(values)) != len(values):
            raise ValueError(f"two classes share a label value: {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        sources = [name for name in ("dataset", "images", "csv") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"give one data source, not {' and '.join(sources)}")
        if self.labels is not None and self.images is None:
            raise ValueError("'labels' needs an 'images' folder to pair with")
        return self


class PreprocessConfig(Section):
    """Intensity normalisation and, for volumes, the model-space grid.

    intensity: zscore (per case and channel, nnU-Net's default for non-CT), percentile
    (clip to the given percentiles, scale to 0..1), ct_window (clip HU to ``window``,
    scale to 0..1) or none. orientation/spacing apply to 3D scans with a physical
    voxel size only; 2D images and microscopy stacks keep their pixel grid.
    """

    intensity: Literal["zscore", "percentile", "ct_window", "none"] = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-160.0, 240.0)
    orientation: str | None = None
    spacing: list[float] | None = None

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str | None) -> str | None:
        if value is None:
            return value
        value = value.upper()
        pairs = [set("LR"), set("PA"), set("IS")]
        if len(value) != 3 or any(sum(c in pair for c in value) != 1 for pair in pairs):
            raise ValueError(f"orientation must be three axis codes, one of L/R, P/A, I/S each (e.g. RAS), got {value!r}")
        return value


class ModelConfig(Section):
    """A model from the registry by name; ``options`` are family-specific keyword arguments."""

    name: str
    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(2, ge=1)
    features: int = Field(32, ge=1)
    depth: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


# Arithmetic of the forward passes; medseg.device.choose_precision says what each means on a device.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class AugmentConfig(Section):
    """Training augmentation: the U-Net paper's elastic deformation plus affine and grey-value changes.

    Field names follow medseg.augment.ElasticAugment; ``enabled: false`` turns it all off.
    """

    enabled: bool = True
    grid_size: int = Field(3, ge=2)
    sigma: float = Field(10.0, ge=0.0)
    p_elastic: float = Field(0.9, ge=0.0, le=1.0)
    rotate_degrees: float = Field(180.0, ge=0.0)
    p_rotate: float = Field(0.5, ge=0.0, le=1.0)
    shift: float = Field(0.1, ge=0.0)
    p_shift: float = Field(0.5, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.85, 1.15)
    p_scale: float = Field(0.3, ge=0.0, le=1.0)
    p_flip: float = Field(0.5, ge=0.0, le=1.0)
    flip_axes: list[int] | None = None
    brightness: float = Field(0.1, ge=0.0)
    contrast: float = Field(0.15, ge=0.0)
    gamma: float = Field(0.2, ge=0.0)
    p_intensity: float = Field(0.3, ge=0.0, le=1.0)
    image_mode: Literal["bilinear", "bicubic"] = "bilinear"
    padding_mode: Literal["reflection", "zeros", "border"] = "reflection"


class TrainConfig(Section):
    """The training loop's settings.

    Training runs ``epochs`` epochs of ``steps_per_epoch`` batches of random patches, or
    stops earlier at ``time_budget_minutes`` or after ``early_stop_patience`` validations
    without improvement. ``loss``: dice_ce (MONAI DiceCELoss), ce (plain cross-entropy) or
    weighted_ce (the U-Net paper's cross-entropy with its border weight map, instances from
    ``border_class``).
    ``ema_decay``: validate, checkpoint and predict with an exponential moving average of
    the weights, which smooths the step-to-step noise of small batches; training itself
    continues on the raw weights. The decay per step warms up as min(ema_decay, (1 + n) /
    (10 + n)), so for the first (10 ema_decay - 1) / (1 - ema_decay) steps (4490 for 0.998)
    the average covers mostly the last fifth of the steps so far, and ema_decay caps it after.
    ``precision``: auto is mixed fp16 on CUDA, bf16 on CPUs with native bf16 arithmetic
    (AVX512-BF16/AMX, about 2x faster there) and fp32 otherwise; fp32 forces full precision.
    """

    epochs: int = Field(50, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    time_budget_minutes: float | None = Field(None, gt=0.0)
    batch_size: int = Field(4, ge=1)
    patch_size: list[int] = Field(default_factory=lambda: [256, 256])
    foreground_oversample: float = Field(0.33, ge=0.0, le=1.0)
    slice_axis: int = Field(-1, ge=-3, le=2)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    schedule: Literal["poly", "constant"] = "poly"
    grad_clip: float | None = Field(12.0, gt=0.0)
    loss: Literal["dice_ce", "ce", "weighted_ce"] = "dice_ce"
    border_class: str | None = None
    border_w0: float = Field(10.0, ge=0.0)
    border_sigma: float = Field(5.0, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    val_every: int = Field(1, ge=1)
    early_stop_patience: int | None = Field(None, ge=1)
    early_stop_min_delta: float = Field(1e-4, ge=0.0)
    precision: Precision = "auto"
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"

    @property
    def slice_dim(self) -> int:
        """Axis of a (C, x, y, z) tensor that a 2D model slices a volume along."""
        return self.slice_axis % 3 + 1


class InferConfig(Section):
    """Sliding-window inference settings.

    tta: average the softmax over every mirroring of the axes training mirrored along
    (``augment.flip_axes``; 2^axes passes), the axes nnU-Net mirrors too. A model never
    trained on mirrored samples is mirrored along every axis, with a warning: unlike
    nnU-Net, which then skips mirroring, medseg does what was asked and says it costs.
    precision: as ``train.precision``; windows are blended and softmaxed in fp32.
    """

    roi_size: list[int] | None = None
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(4, ge=1)
    tta: bool = False
    precision: Precision = "auto"
    device: str = "auto"


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

    def check(self) -> None:
        """Cross-section rules that single fields cannot express."""
        names = list(self.data.classes)
        if self.model.out_channels != len(names):
            raise ValueError(f"model.out_channels is {self.model.out_channels} but data.classes names {len(names)} classes")
        if self.train.border_class is not None and self.train.border_class not in names:
            raise ValueError(f"train.border_class {self.train.border_class!r} is not one of data.classes {names}")
        if self.train.loss == "weighted_ce" and self.train.border_class is None:
            raise ValueError("train.loss weighted_ce needs train.border_class (the class whose instances touch, e.g. cell)")
        flip_axes = self.augment.flip_axes
        if flip_axes is not None and (len(set(flip_axes)) != len(flip_axes) or any(not 0 <= a < self.model.spatial_dims for a in flip_axes)):
            raise ValueError(f"augment.flip_axes {flip_axes}: give distinct spatial axes in 0..{self.model.spatial_dims - 1} "
                             f"(0 is the first axis after the channel), or leave it unset to mirror along every axis")
        if self.augment.image_mode == "bicubic" and self.model.spatial_dims == 3:
            raise ValueError("augment.image_mode bicubic needs model.spatial_dims 2 (torch resamples volumes "
                             "bilinear only); use image_mode bilinear for a 3D model")
        if len(self.train.patch_size) != self.model.spatial_dims:
            raise ValueError(f"train.patch_size {self.train.patch_size} must have model.spatial_dims={self.model.spatial_dims} values")

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


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def describe_validation_error(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = _dotted(err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key (check the spelling; see the documented sections)")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required value is missing")
        else:
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
            lines.append(f"{source}: {key}: {err['msg']}{shown}")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (5, 1e-3, [64, 64], true)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} {key}: value {text!r} is not valid YAML ({exc})") from exc
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None, source: str = "config") -> Config:
    """Validate plain data into a Config; errors name ``source`` and the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (data, model, train, ...)")
    try:
        config = Config.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise describe_validation_error(exc, source) from None
    try:
        config.check()
    except ValueError as exc:
        raise ConfigError(f"invalid config:\n  {source}: {exc}") from None
    return config


def load_config(path: Path | str, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train, ...)")
    apply_overrides(raw, overrides, source=f"{path} (--set)")
    config = config_from_dict(raw, base_dir=path.resolve().parent, source=str(path))
    config.source = path.resolve()
    return config
