"""Experiment configs: YAML validated by pydantic, with dotted overrides.

A config is data: every section forbids unknown keys, so a typo is an error that names
the file and the dotted key instead of a silently ignored setting. Relative paths in a
config resolve against the config file's folder, so a config works from any directory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

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

from medseg.constants import PRECISIONS, Precision  # noqa: F401  (PRECISIONS: also exported from here)
from medseg.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "ChannelStats",
    "packaged_config",
    "Config",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "PreprocessConfig",
    "SplitConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "instance_class",
    "load_config",
    "load_yaml",
    "read_yaml_file",
]

# --- limits: a config is untrusted input, so what it can ask for is bounded --------------------------------
# Real configs are a few KiB, a few hundred values, at most six levels deep and use a handful of anchors;
# the YAML limits are 100x that, and refuse an alias bomb ("billion laughs": 30 lines that expand to 10^9
# values) from the composed node graph, before anything is expanded.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 1_000
MAX_INT_DIGITS = 32  # longer integer literals are typos or attacks (Python refuses > 4300 digits with a ValueError)
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


class YamlLimitError(yaml.YAMLError):
    """A YAML document asks for more than a config may: too big, too deep, too many aliases.

    ``key`` is the dotted key where the problem sits ("" for the whole document)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key or '(top level)'}: {problem}")
        self.key = key
        self.problem = problem


_YAML12_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with limits checked while composing, before any value is constructed.

    The composer builds a node graph in which an alias is one shared node, so its size is the
    size of the text; expanding that graph into Python values is what makes an alias bomb
    explode. So nesting depth and alias count are checked as nodes are composed, and the
    expanded size and depth are computed from the graph (each node once) before
    construction. Recursive aliases are refused. Keys are tracked so errors name them.
    ``1e9`` and ``1e-3`` load as numbers (YAML 1.2, what people write) rather than strings.
    """

    def __init__(self, stream: str, prefix: Sequence[str] = ()) -> None:
        super().__init__(stream)
        self._keys: list[str] = list(prefix)
        self._aliases = 0
        self._node_keys: dict[int, str] = {}

    def _dotted_key(self) -> str:
        return ".".join(k for k in self._keys if k)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        label = index.value if isinstance(index, yaml.ScalarNode) else "" if index is None else str(index)
        self._keys.append(str(label)[:40])
        try:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise YamlLimitError(
                        self._dotted_key(),
                        f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out instead",
                    )
                return super().compose_node(parent, index)  # the shared node keeps the key of its anchor
            if len(self._keys) > MAX_YAML_DEPTH:
                raise YamlLimitError(
                    self._dotted_key(),
                    f"nested more than {MAX_YAML_DEPTH} levels deep; "
                    "a config needs a handful of levels, flatten this value",
                )
            node = super().compose_node(parent, index)
            self._node_keys[id(node)] = self._dotted_key()
            return node
        finally:
            self._keys.pop()

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node, self._node_keys)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise YamlLimitError(
                self._node_keys.get(id(node), ""),
                f"an integer of {len(node.value)} characters; no setting needs more than {MAX_INT_DIGITS}",
            )
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_EXPONENT, list("-+0123456789."))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, node_keys: dict[int, str]) -> None:
    """Refuse a node graph whose expansion (aliases copied out) is too big, too deep or infinite.

    Iterative, each node once: sizes of shared (aliased) nodes are memoised, so a graph
    that would expand to 10^9 values is measured in as many steps as it has nodes."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [sizes[id(k)] for k in _children(node)]
            sizes[key] = (1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0))
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlLimitError(
                node_keys.get(key, ""),
                "a recursive alias (a value that contains itself); a config is a tree, write the value out",
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in sizes)
    values, depth = sizes[id(root)]
    if values > MAX_YAML_VALUES:
        where = _largest_key(root, lambda n: sizes[id(n)][0] > MAX_YAML_VALUES, node_keys)
        raise YamlLimitError(
            where,
            f"anchors and aliases expand this to {values:.3g} values, more than the "
            f"{MAX_YAML_VALUES} a config may hold (an alias bomb?); write the values out or use fewer aliases",
        )
    if depth > MAX_YAML_DEPTH:
        where = _largest_key(root, lambda n: sizes[id(n)][1] > MAX_YAML_DEPTH - 1, node_keys)
        raise YamlLimitError(
            where,
            f"aliases nest this {depth} levels deep, more than {MAX_YAML_DEPTH}; "
            "a config needs a handful of levels, flatten this value",
        )


def _largest_key(root: yaml.Node, too_big: Any, node_keys: dict[int, str]) -> str:
    """The deepest mapping key on the one path of too-big values (where an alias bomb starts)."""
    node = root
    while isinstance(node, yaml.MappingNode):
        big = [value for _, value in node.value if too_big(value)]
        if len(big) != 1:
            break
        node = big[0]
    return node_keys.get(id(node), "")


def load_yaml(text: str, prefix: Sequence[str] = ()) -> Any:
    """Load YAML within the limits above (see :class:`BoundedLoader`).

    ``prefix`` is the dotted key the text sits under (an override's key), so that depth
    counts from there and errors name the full key.

    Raises:
        YamlLimitError: the document asks for too much (names the dotted key).
        yaml.YAMLError: the text is not YAML.
    """
    loader = BoundedLoader(text, prefix)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
    ``log_every_seconds``, ``log_every_steps``: without a terminal (a job's log file, a
    Prefect worker) progress is a log line with loss, speed and time left whenever either
    many seconds or steps have passed since the last line (null turns that rule off), and
    a line per epoch; in a terminal it is a bar.
    """

    epochs: int = Field(50, ge=1, le=MAX_STEPS)
    steps_per_epoch: int = Field(50, ge=1, le=MAX_STEPS)
    time_budget_minutes: float | None = Field(None, gt=0.0, le=60 * 24 * 366)  # a year
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


def _clip(text: str, limit: int = 120) -> str:
    """A value as an error shows it: a hostile megabyte-long value is not echoed whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
            shown = "" if isinstance(given, (dict, list)) else f" (got {_clip(repr(given))})"
            lines.append(f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}{shown}")
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
        if len(parts) >= MAX_YAML_DEPTH:
            raise ConfigError(f"{source} {key}: {len(parts)} levels of keys; a config nests a handful, check the key")
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{source} {key}: a value of {len(text)} characters, larger than a whole config may be "
                f"({MAX_CONFIG_BYTES} bytes); put it in the config file"
            )
        try:
            value = load_yaml(text, parts) if text.strip() else None
        except YamlLimitError as exc:
            raise ConfigError(f"{source} {exc.key}: {exc.problem}") from None
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


def read_yaml_file(path: Path) -> Any:
    """A YAML file read within the limits (size, depth, aliases); every problem is a ConfigError naming it.

    Used for experiment configs and the nightly config alike, so neither can be a bomb.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)  # bounded: a config path may name /dev/zero or a huge file
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_CONFIG_BYTES} bytes, far more than a config holds; "
                "check that this is the config file"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        return load_yaml(text) or {}
    except YamlLimitError as exc:
        raise ConfigError(f"{path}: {exc.key or '(top level)'}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def packaged_config(name: str) -> Path:
    """A config shipped with medseg (the repository's ``configs/``, installed as ``medseg.configs``).

    Why through the package: an installed wheel has no repository beside it, so a path built
    from ``__file__`` would point nowhere; the package resource is found the same way from a
    wheel and from a checkout.
    """
    from importlib import resources

    if not NAME_PATTERN.fullmatch(name) or not name.endswith(".yaml"):
        raise ConfigError(f"{name!r} is not the name of a shipped config (e.g. nightly.yaml)")
    found = resources.files("medseg.configs").joinpath(name)
    if not found.is_file():
        shipped = sorted(p.name for p in resources.files("medseg.configs").iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"medseg ships no config named {name}; shipped: {', '.join(shipped)}")
    return Path(str(found))


def load_config(path: Path | str, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train, ...)")
    apply_overrides(raw, overrides, source=f"{path} (--set)")
    config = config_from_dict(raw, base_dir=path.resolve().parent, source=str(path))
    config.source = path.resolve()
    return config
