"""The sections of an experiment config (data, preprocess, model, augment, train, infer) and their bounds.

Every section forbids unknown keys and every number has a range checked at load time, so a
typo or an absurd value is an error naming the dotted key, not a failure (or a write) later.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medseg.constants import Precision

__all__ = [
    "AugmentConfig",
    "ChannelStats",
    "ClassCodingConfig",
    "CodeConfig",
    "ConfigPath",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "PreprocessConfig",
    "Section",
    "SplitConfig",
    "TrainConfig",
    "instance_class",
]

# A name becomes a folder under output_dir: one plain path component that any file system takes.
MAX_NAME_LENGTH = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_PATH_LENGTH = 4096  # PATH_MAX on Linux
# Sizes: one patch or window of at most 256^3 voxels (nnU-Net's largest 3D patches are 128^3-ish), and a
# batch of at most 2^28 voxels (1 GiB of fp32 input per channel, before a single activation).
MAX_SIDE = 4096
MAX_WINDOW_VOXELS = 1 << 24
MAX_BATCH_VOXELS = 1 << 28
MAX_BATCH = 4096
# A model of at most 2^30 parameters: 4 GiB of fp32 weights, about 16 GiB with Adam's state and gradients
# (the paper U-Net has 31M, FCN-8s at width 64 134M).
MAX_PARAMETERS = 1 << 30
MAX_STEPS = 100_000  # epochs, steps per epoch, validation interval, patience; nnU-Net trains 1000 epochs of 250 steps
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
LABEL_MIN, LABEL_MAX = -(2**31), 2**31 - 1  # label values a 32-bit label image can hold


def _check_sizes(value: list[int]) -> list[int]:
    """A patch or window: 2 or 3 sides of 1 to MAX_SIDE, at most MAX_WINDOW_VOXELS in all."""
    if not 2 <= len(value) <= 3:
        raise ValueError(f"give one size per spatial axis (2 or 3 values), got {value}")
    if any(not 1 <= side <= MAX_SIDE for side in value):
        raise ValueError(f"every size must be 1 to {MAX_SIDE}, got {value}")
    if math.prod(value) > MAX_WINDOW_VOXELS:
        raise ValueError(
            f"{value} is {math.prod(value)} voxels, more than {MAX_WINDOW_VOXELS} (256^3); "
            "use smaller patches, sliding windows cover the rest"
        )
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    text = str(value)
    if len(text) > MAX_PATH_LENGTH:
        raise ValueError(f"a path of {len(text)} characters; paths are at most {MAX_PATH_LENGTH}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{text!r} holds a control character (a NUL, newline or escape); write the path without it")
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; values are checked on assignment;
    no number is infinite or NaN (``.inf`` or ``1e999`` is never a setting, only a typo or an attack)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SplitConfig(Section):
    """How cases divide into training and validation.

    manifest: the split column of data_manifest.csv; cases: explicit lists;
    fraction: a seeded random validation fraction; kfold: fold ``fold`` of ``folds``.
    """

    mode: Literal["manifest", "cases", "fraction", "kfold"] = "manifest"
    train: list[str] | None = None
    val: list[str] | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    folds: int = Field(5, ge=2, le=1000)
    fold: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
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


def instance_class(classes: dict[str, int]) -> str:
    """The class instance labels belong to: the one class of two whose value is not 0."""
    others = [name for name, value in classes.items() if value != 0]
    if len(classes) != 2 or len(others) != 1:
        raise ValueError(
            f"instance labels hold objects of one class, so data.classes must name two classes, background "
            f"with value 0 and the objects' class (e.g. {{background: 0, nucleus: 1}}), not {classes}"
        )
    return others[0]


class DataConfig(Section):
    """Where the cases come from and what their label values mean.

    Exactly one source: a manifest ``dataset`` id, an ``images`` folder (with a
    ``labels`` folder paired by case name), or a ``csv`` of image,label paths.

    labels_are: what the values of a label map file mean: ``classes`` (the values of
    ``classes``) or ``instances`` (object ids, 0 background, e.g. a 16-bit TIFF/PNG; the
    objects are of the one class that is not 0, and training separates touching ones). A
    map holding 1..N cannot tell the two apart, so the config says it. The per-image
    layout (``CASE/images`` + ``CASE/masks``, one mask file per object) is instances
    whatever this says: its layout is unambiguous.
    """

    dataset: str | None = None
    root: ConfigPath | None = None
    images: ConfigPath | None = None
    labels: ConfigPath | None = None
    csv: ConfigPath | None = None
    classes: dict[str, int] = Field(default_factory=lambda: {"background": 0, "foreground": 1})
    color: Literal["grey", "channels"] = "grey"
    labels_are: Literal["classes", "instances"] = "classes"
    split: SplitConfig = Field(default_factory=SplitConfig)
    # DICOM SEG codes per class name, over medseg.export.seg_coding's SNOMED CT table (e.g. for site-specific classes).
    classes_coding: dict[str, ClassCodingConfig] | None = None

    @model_validator(mode="after")
    def _coded_classes_exist(self) -> DataConfig:
        unknown = sorted(set(self.classes_coding or {}) - set(self.classes))
        if unknown:
            raise ValueError(
                f"classes_coding names {unknown}, which are not in classes {list(self.classes)}; "
                "use the class names exactly as data.classes spells them"
            )
        return self

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: dict[str, int]) -> dict[str, int]:
        if len(value) < 2:
            raise ValueError("at least two classes are needed (e.g. background and one structure)")
        values = list(value.values())
        if len(set(values)) != len(values):
            raise ValueError(f"two classes share a label value: {value}")
        outside = {name: v for name, v in value.items() if not LABEL_MIN <= v <= LABEL_MAX}
        if outside:
            raise ValueError(
                f"label values {outside} do not fit a 32-bit label image ({LABEL_MIN}..{LABEL_MAX}); "
                "give the values the label files hold"
            )
        return value

    @model_validator(mode="after")
    def _instances_have_one_class(self) -> "DataConfig":
        if self.labels_are == "instances":
            instance_class(self.classes)
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        sources = [name for name in ("dataset", "images", "csv") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"give one data source, not {' and '.join(sources)}")
        if self.labels is not None and self.images is None:
            raise ValueError("'labels' needs an 'images' folder to pair with")
        return self


class ChannelStats(Section):
    """One input channel's intensities over the training set's foreground, as ``medseg plan`` measures them.

    low/high: the values to clip to (nnU-Net: the 0.5th and 99.5th percentiles of the
    foreground voxels of all training cases); mean/std: the foreground's mean and
    standard deviation, which the clipped values are z-scored with.
    """

    low: float
    high: float
    mean: float
    std: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> ChannelStats:
        if not self.low < self.high:
            raise ValueError(f"give low < high (the values to clip to), got low {self.low} and high {self.high}")
        return self


class PreprocessConfig(Section):
    """Intensity normalisation and, for volumes, the model-space grid.

    intensity: zscore (per case and channel, nnU-Net's default for non-CT), dataset_zscore
    (clip each channel to its ``channel_stats`` low..high, then subtract the dataset's mean
    and divide by its std: nnU-Net's CT scheme, where intensities mean the same in every
    scan), percentile (clip to the given percentiles, scale to 0..1), ct_window (clip HU
    to ``window``, scale to 0..1) or none. orientation/spacing apply to 3D scans with a
    physical voxel size only; 2D images and microscopy stacks keep their pixel grid.
    """

    intensity: Literal["zscore", "dataset_zscore", "percentile", "ct_window", "none"] = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-160.0, 240.0)
    channel_stats: list[ChannelStats] | None = Field(None, max_length=1024)
    orientation: str | None = None
    spacing: list[float] | None = None

    @model_validator(mode="after")
    def _stats_for_dataset_zscore(self) -> PreprocessConfig:
        if self.intensity == "dataset_zscore" and not self.channel_stats:
            raise ValueError(
                "intensity dataset_zscore needs channel_stats (one {low, high, mean, std} per input channel; "
                "medseg plan measures them), or use intensity zscore"
            )
        return self

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str | None) -> str | None:
        if value is None:
            return value
        value = value.upper()
        pairs = [set("LR"), set("PA"), set("IS")]
        if len(value) != 3 or any(sum(c in pair for c in value) != 1 for pair in pairs):
            raise ValueError(
                f"orientation must be three axis codes, one of L/R, P/A, I/S each (e.g. RAS), got {value!r}"
            )
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"give [low, high] percentiles with 0 <= low < high <= 100, got {list(value)}")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"give a [low, high] window with low < high (e.g. [-160, 240] HU), got {list(value)}")
        return value

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 3 or any(v <= 0 for v in value)):
            raise ValueError(f"give three positive voxel sizes in mm (x, y, z), e.g. [1.5, 1.5, 2.5], got {value}")
        return value


class ModelConfig(Section):
    """A model from the registry by name; ``options`` are family-specific keyword arguments."""

    name: str
    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1, le=1024)
    out_channels: int = Field(2, ge=1, le=1024)
    features: int = Field(32, ge=1, le=1024)
    depth: int | None = Field(None, ge=1, le=8)  # 2^8 = 256: every patch side a multiple of 256 already
    options: dict[str, Any] = Field(default_factory=dict)


class AugmentConfig(Section):
    """Training augmentation: the U-Net paper's elastic deformation plus affine and grey-value changes.

    Field names follow medseg.data.augment.ElasticAugment; ``enabled: false`` turns it all off.
    """

    enabled: bool = True
    grid_size: int = Field(3, ge=2, le=64)  # control points per axis: a (grid_size^dims) tensor per sample
    sigma: float = Field(10.0, ge=0.0, le=1000.0)
    # The paper deforms every sample; 0.9 keeps a tenth undeformed (the ISBI result was trained so).
    p_elastic: float = Field(0.9, ge=0.0, le=1.0)
    # Uniform in [-r, r] (180 covers every angle). 15 by default: scans come in a canonical
    # orientation (anatomy upright in CT/MR, sections as cut in EM), every shipped config uses
    # 10-30, and nnU-Net's 3D default is 30; 180 would spend capacity on orientations never seen.
    rotate_degrees: float = Field(15.0, ge=0.0, le=180.0)
    p_rotate: float = Field(0.5, ge=0.0, le=1.0)
    shift: float = Field(0.1, ge=0.0, le=1.0)  # a fraction of each axis's extent
    p_shift: float = Field(0.5, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.85, 1.15)
    p_scale: float = Field(0.3, ge=0.0, le=1.0)
    p_flip: float = Field(0.5, ge=0.0, le=1.0)
    flip_axes: list[int] | None = None
    brightness: float = Field(0.1, ge=0.0, le=1.0)  # a fraction of the grey-value range
    contrast: float = Field(0.15, ge=0.0, le=1.0)  # factors in [1 - c, 1 + c]: above 1 would invert
    gamma: float = Field(0.2, ge=0.0, le=3.0)  # exponents exp(u), u in [-gamma, gamma]: up to 20x
    p_intensity: float = Field(0.3, ge=0.0, le=1.0)
    image_mode: Literal["bilinear", "bicubic"] = "bilinear"
    padding_mode: Literal["reflection", "zeros", "border"] = "reflection"

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.1 <= value[0] <= value[1] <= 10.0:
            raise ValueError(f"give a [low, high] zoom range with 0.1 <= low <= high <= 10, got {list(value)}")
        return value


class TrainConfig(Section):
    """The training loop's settings.

    Training runs ``epochs`` epochs of ``steps_per_epoch`` batches of random patches, or
    stops earlier at ``time_budget_minutes`` or after ``early_stop_patience`` validations
    without improvement. ``time_budget_clock``: wall counts wall-clock minutes; cpu counts the
    training process's CPU minutes (all its threads: 2 threads busy for 15 minutes spend 30),
    so runs on a shared, busy machine get the same compute; the history's ``seconds`` use the
    same clock. ``loss``: dice_ce (MONAI DiceCELoss), ce (plain cross-entropy) or
    weighted_ce (the U-Net paper's cross-entropy with its border weight map, instances from
    ``border_class``).
    ``ema_decay``: validate, checkpoint and predict with an exponential moving average of
    the weights, which smooths the step-to-step noise of small batches; training itself
    continues on the raw weights. The decay per step warms up as min(ema_decay, (1 + n) /
    (10 + n)), so for the first (10 ema_decay - 1) / (1 - ema_decay) steps (4490 for 0.998)
    the average covers mostly the last fifth of the steps so far, and ema_decay caps it after.
    ``precision``: auto is mixed fp16 on CUDA, bf16 on CPUs with native bf16 arithmetic
    (AVX512-BF16/AMX, about 2x faster there) and fp32 otherwise; fp32 forces full precision.
    ``log_every_seconds``, ``log_every_steps``: without a terminal (a job's log file, a
    Prefect worker) progress is a log line with loss, speed and time left whenever either
    many seconds or steps have passed since the last line (null turns that rule off), and
    a line per epoch; in a terminal it is a bar.
    """

    epochs: int = Field(50, ge=1, le=MAX_STEPS)
    steps_per_epoch: int = Field(50, ge=1, le=MAX_STEPS)
    time_budget_minutes: float | None = Field(None, gt=0.0, le=60 * 24 * 366)  # a year
    time_budget_clock: Literal["wall", "cpu"] = "wall"
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    patch_size: list[int] = Field(default_factory=lambda: [256, 256])
    foreground_oversample: float = Field(0.33, ge=0.0, le=1.0)
    slice_axis: int = Field(-1, ge=-3, le=2)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-5, ge=0.0, le=1.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    schedule: Literal["poly", "constant"] = "poly"
    grad_clip: float | None = Field(12.0, gt=0.0)
    loss: Literal["dice_ce", "ce", "weighted_ce"] = "dice_ce"
    border_class: str | None = None
    border_w0: float = Field(10.0, ge=0.0, le=1000.0)
    border_sigma: float = Field(5.0, gt=0.0, le=1000.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    val_every: int = Field(1, ge=1, le=MAX_STEPS)
    early_stop_patience: int | None = Field(None, ge=1, le=MAX_STEPS)
    early_stop_min_delta: float = Field(1e-4, ge=0.0)
    precision: Precision = "auto"
    channels_last: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "auto"
    log_every_seconds: float | None = Field(30.0, gt=0.0, le=24 * 3600.0)
    log_every_steps: int | None = Field(None, ge=1, le=MAX_STEPS)

    @field_validator("patch_size")
    @classmethod
    def _patch_size(cls, value: list[int]) -> list[int]:
        return _check_sizes(value)

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
    # Windows step by roi * (1 - overlap): 0.9 is already 10x the windows per axis (1000x in 3D); beyond it
    # the window list alone outgrows memory (0.999 on a 512^3 volume: 57M windows).
    overlap: float = Field(0.5, ge=0.0, le=0.9)
    sw_batch_size: int = Field(4, ge=1, le=1024)
    tta: bool = False
    precision: Precision = "auto"
    device: str = "auto"

    @field_validator("roi_size")
    @classmethod
    def _roi_size(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else _check_sizes(value)
