"""Loading a config: YAML file → dotted --set overrides → validation, with errors that name the file and key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from medseg.config.schema import Config
from medseg.config.sections import NAME_PATTERN
from medseg.config.yaml_limits import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, YamlLimitError, load_yaml, read_yaml_file
from medseg.errors import ConfigError

__all__ = ["apply_overrides", "config_from_dict", "describe_validation_error", "load_config", "packaged_config"]


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
