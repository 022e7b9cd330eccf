"""Checkpoints: everything needed to predict or resume, and nothing that can run code.

A checkpoint is a dict of tensors and plain values, saved atomically and loaded with
``torch.load(weights_only=True)``, so a tampered file cannot execute anything.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from medseg import __version__
from medseg.errors import MedsegError

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint"]

FORMAT = "medseg-checkpoint/1"


class CheckpointError(MedsegError):
    """A checkpoint is missing, corrupt, unsafe, or not a medseg checkpoint."""


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` (plus format and version) to ``path`` atomically: temp file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "medseg_version": __version__, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medseg checkpoint safely (weights_only); errors say what is wrong and what to do."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a run folder or its best.pt/latest.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects that could run code ({exc}). "
            "medseg checkpoints hold only tensors and plain values; use a checkpoint written by `medseg train`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}); it may be truncated, retrain or copy it again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medseg checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state
