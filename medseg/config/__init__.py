"""Experiment configs: YAML validated by pydantic, with dotted overrides.

A config is data: every section forbids unknown keys, so a typo is an error that names
the file and the dotted key instead of a silently ignored setting. Relative paths in a
config resolve against the config file's folder, so a config works from any directory.

`yaml_limits` reads YAML as untrusted input (bounded size, values, depth, aliases);
`sections` holds each section's fields and ranges, `schema` the whole `Config`;
`loading` turns a file and ``--set`` overrides into a validated `Config`.
"""

from medseg.config.loading import (
    apply_overrides,
    config_from_dict,
    describe_validation_error,
    load_config,
    packaged_config,
)
from medseg.config.schema import Config
from medseg.config.sections import (
    NAME_PATTERN,
    AugmentConfig,
    ChannelStats,
    ConfigPath,
    DataConfig,
    InferConfig,
    ModelConfig,
    PreprocessConfig,
    Section,
    SplitConfig,
    TrainConfig,
    instance_class,
)
from medseg.config.yaml_limits import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    YamlLimitError,
    load_yaml,
    read_yaml_file,
)
from medseg.constants import PRECISIONS

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_YAML_ALIASES",
    "MAX_YAML_DEPTH",
    "NAME_PATTERN",
    "PRECISIONS",
    "AugmentConfig",
    "ChannelStats",
    "Config",
    "ConfigPath",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "PreprocessConfig",
    "Section",
    "SplitConfig",
    "TrainConfig",
    "YamlLimitError",
    "apply_overrides",
    "config_from_dict",
    "describe_validation_error",
    "instance_class",
    "load_config",
    "load_yaml",
    "packaged_config",
    "read_yaml_file",
]
