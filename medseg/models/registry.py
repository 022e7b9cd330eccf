"""Name -> model registry: models register themselves, configs build them by name.

A decorator fills one dict, so adding a model is one module with one ``@register_model``
line and no edit anywhere else (no if/elif over names). ``build_model`` checks a
config against the registered constructor's own signature, so a typo in a config's
``options`` is reported with the accepted names instead of a ``TypeError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from torch import nn

from medseg.errors import ConfigError

__all__ = ["build_model", "list_models", "model_options", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FIXED: dict[str, dict[str, Any]] = {}  # constructor arguments a registered name fixes (e.g. fcn8s: stride 8)

# Fields of a model config (medseg.config.ModelConfig has exactly these).
_CONFIG_FIELDS = ("name", "spatial_dims", "in_channels", "out_channels", "features", "depth", "options")
_REQUIRED_FIELDS = ("name", "spatial_dims", "in_channels", "out_channels")
# Constructor arguments set from the config's own fields, never from ``options``.
_COMMON_ARGS = ("spatial_dims", "in_channels", "out_channels", "features", "depth")

T = TypeVar("T", bound=Callable[..., nn.Module])


def register_model(name: str, **fixed: Any) -> Callable[[T], T]:
    """Register a model class (or factory function) under ``name``.

    The constructor must take ``spatial_dims, in_channels, out_channels`` and
    ``features``; ``depth`` only if the family has a variable depth. Every other
    keyword argument becomes an accepted config option, except those ``fixed`` here: one
    class registered under several names, each with its own fixed arguments (FCN-32s,
    -16s and -8s are one class with the output stride fixed), instead of a copied
    constructor per variant.

    Example:
        >>> @register_model("tiny")
        ... class Tiny(nn.Module):
        ...     def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 8): ...
    """

    def add(builder: T) -> T:
        old = _MODELS.get(name)
        if old is not None and _qualified(old) != _qualified(builder):  # a reloaded module may re-register
            raise ValueError(f"a model named {name!r} is already registered ({_MODELS[name]!r})")
        params = inspect.signature(builder).parameters
        missing = [p for p in ("spatial_dims", "in_channels", "out_channels", "features") if p not in params]
        if missing:
            raise TypeError(f"model {name!r} ({builder!r}) must accept {', '.join(missing)}")
        unknown = [key for key in fixed if key not in params or key in _COMMON_ARGS]
        if unknown:
            raise TypeError(f"model {name!r} ({builder!r}) cannot fix {', '.join(unknown)}: not an option it takes")
        _MODELS[name] = builder
        _FIXED[name] = dict(fixed)
        return builder

    return add


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The option names (``cfg.options`` keys) that model ``name`` accepts, sorted."""
    params = inspect.signature(_lookup(name)).parameters
    fixed = _FIXED.get(name, {})
    return sorted(
        p.name
        for p in params.values()
        if p.name not in _COMMON_ARGS and p.name not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def build_model(cfg: Mapping[str, Any] | Any) -> nn.Module:
    """Build the model a config names.

    Args:
        cfg: a mapping, or any object with the attributes ``name``, ``spatial_dims``
            (2 or 3), ``in_channels``, ``out_channels``, ``features`` (base width),
            ``depth`` (None: the family's default) and ``options`` (family-specific
            keyword arguments, e.g. ``{"batch_norm": False, "padding": "valid"}``).
            Unset ``features``/``depth``/``options`` take the family's defaults.

    Raises:
        ConfigError: unknown model name (lists the registered ones), unknown option
            (lists the accepted ones), a depth for a fixed-depth family, or a value
            the model rejects.

    Example:
        >>> build_model({"name": "unet", "spatial_dims": 2, "in_channels": 1,
        ...              "out_channels": 2, "features": 32, "depth": 4,
        ...              "options": {"padding": "valid"}})
    """
    fields = _read_config(cfg)
    name = fields["name"]
    builder = _lookup(name)
    params = inspect.signature(builder).parameters

    kwargs: dict[str, Any] = {k: fields[k] for k in ("spatial_dims", "in_channels", "out_channels")}
    if fields.get("features") is not None:
        kwargs["features"] = fields["features"]
    if fields.get("depth") is not None:
        if "depth" not in params:
            raise ConfigError(f"model {name!r} has a fixed depth; remove model.depth (got {fields['depth']!r})")
        kwargs["depth"] = fields["depth"]

    options = fields.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"model.options must be a mapping of option names to values, got {options!r}")
    accepted = model_options(name)
    for key in options:
        if key not in accepted:
            where = "a top-level model field, not an option" if key in _COMMON_ARGS else "not an option"
            raise ConfigError(
                f"model {name!r}: {key!r} is {where}; accepted options: {', '.join(accepted) or '(none)'}"
            )
    kwargs.update(options)
    kwargs.update(_FIXED.get(name, {}))

    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r} cannot be built from this config: {exc}") from exc


def _qualified(builder: Callable[..., Any]) -> str:
    return f"{builder.__module__}.{builder.__qualname__}"


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None


def _read_config(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config's fields as a dict, whether ``cfg`` is a mapping or an attribute object."""
    if isinstance(cfg, Mapping):
        unknown = [k for k in cfg if k not in _CONFIG_FIELDS]
        if unknown:
            raise ConfigError(
                f"unknown model config field(s) {', '.join(map(repr, unknown))}; "
                f"fields: {', '.join(_CONFIG_FIELDS)} (model-specific settings go under 'options')"
            )
        fields = dict(cfg)
    else:
        fields = {k: getattr(cfg, k) for k in _CONFIG_FIELDS if hasattr(cfg, k)}
    missing = [k for k in _REQUIRED_FIELDS if fields.get(k) is None]
    if missing:
        raise ConfigError(f"model config is missing {', '.join(missing)}")
    return fields
