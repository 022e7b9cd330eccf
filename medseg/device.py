"""Choose the compute device once: CUDA when present, else CPU; code runs unchanged on either."""

from __future__ import annotations

import torch

from medseg.errors import ConfigError

__all__ = ["choose_device"]


def choose_device(name: str = "auto") -> torch.device:
    """'auto' → cuda if available else cpu; 'cpu', 'cuda', 'cuda:1' as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a device name (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu or auto")
    return device
