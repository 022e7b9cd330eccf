"""Checkpoints: one typed object holding everything needed to predict or resume, and nothing that can run code.

A `Checkpoint` is the validated experiment config (model, preprocessing, classes are all
in it: no copies beside it that could disagree), the weights to predict with, and, for a
run that can be resumed, its `TrainingState`. On disk it is a dict of tensors and plain
values with a schema version, written through medseg's atomic writer and read with
``torch.load(weights_only=True)``, so a tampered file cannot execute anything. Schema 1
files (the dict earlier versions wrote, with ``classes`` and ``preprocess`` beside the
config) still load; they are checked to agree with their config.

Training, `Predictor` and the flow read checkpoints only through `load_checkpoint` and
this class; nothing else indexes the stored dict.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg import __version__
from medseg.config import Config, config_from_dict
from medseg.errors import ConfigError, MedsegError
from medseg.files import atomic_path
from medseg.models import build_model

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "TrainingState",
    "SCHEMA",
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_file",
]

SCHEMA = 2
FORMAT = f"medseg-checkpoint/{SCHEMA}"
_READABLE = {"medseg-checkpoint/1": 1, FORMAT: SCHEMA}


class CheckpointError(MedsegError):
    """A checkpoint is missing, corrupt, unsafe, not a medseg checkpoint, or does not fit itself."""


@dataclass
class TrainingState:
    """What an exact resume needs beyond the weights: optimiser, schedule, RNG, progress and history."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int
    best_metric: float
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    rng: list[dict[str, Any]]  # one per rank
    elapsed_seconds: float = 0.0
    training_model: dict[str, torch.Tensor] | None = None  # the raw weights when ``weights`` is their average
    ema_updates: int | None = None

    @property
    def averaged(self) -> bool:
        return self.training_model is not None


_TRAINING_KEYS = tuple(TrainingState.__dataclass_fields__)


@dataclass
class Checkpoint:
    """A trained model with its config; ``weights`` are the ones validated and predicted with."""

    config: Config
    weights: dict[str, torch.Tensor]
    training: TrainingState | None = None
    medseg_version: str = __version__
    schema: int = SCHEMA
    path: Path | None = field(default=None, compare=False)

    @property
    def classes(self) -> dict[str, int]:
        """Class name → label value, in output-channel order."""
        return dict(self.config.data.classes)

    def build_model(self) -> torch.nn.Module:
        """The model of ``config.model`` with ``weights`` loaded; a mismatch is one sentence naming both sides."""
        model = build_model(self.config.model)
        expected = model.state_dict()
        missing = [k for k in expected if k not in self.weights]
        unexpected = [k for k in self.weights if k not in expected]
        wrong = [k for k in expected if k in self.weights and tuple(self.weights[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            detail = []
            if wrong:
                k = wrong[0]
                detail.append(
                    f"{len(wrong)} tensor(s) of another shape (e.g. {k}: stored "
                    f"{tuple(self.weights[k].shape)}, the config's model needs {tuple(expected[k].shape)})"
                )
            if missing:
                detail.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"{len(unexpected)} tensor(s) the model does not have (e.g. {unexpected[0]})")
            model_cfg = self.config.model
            raise CheckpointError(
                f"{self.path or 'checkpoint'}: the stored weights do not fit the stored model config "
                f"({model_cfg.name}, {model_cfg.spatial_dims}D, features {model_cfg.features}): {'; '.join(detail)}; "
                "the file was edited or assembled from two runs, use one written by `medseg train`"
            )
        model.load_state_dict(self.weights)
        return model

    def to_payload(self) -> dict[str, Any]:
        """The plain dict stored on disk (tensors, numbers, strings, lists, dicts only)."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "schema": SCHEMA,
            "medseg_version": self.medseg_version,
            "config": self.config.dump(),
            "model": self.weights,
        }
        if self.training is not None:
            payload["training"] = {k: getattr(self.training, k) for k in _TRAINING_KEYS}
        return payload

    @classmethod
    def from_payload(cls, payload: Any, path: Path) -> Checkpoint:
        """Validate a loaded dict of schema 1 or 2 into a Checkpoint; every problem names the file."""
        if not isinstance(payload, dict) or payload.get("format") not in _READABLE:
            shown = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(
                f"{path}: not a medseg checkpoint (format {shown!r}); use one written by `medseg train`"
            )
        schema = _READABLE[payload["format"]]
        raw = payload.get("config")
        weights = payload.get("model")
        if (
            not isinstance(raw, dict)
            or not isinstance(weights, dict)
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
        ):
            raise CheckpointError(
                f"{path}: a medseg checkpoint without a config or weights; it is damaged, "
                "use one written by `medseg train`"
            )
        try:
            config = config_from_dict(raw, source=f"{path} (stored config)")
        except ConfigError as exc:
            raise CheckpointError(f"{path}: the stored config is not valid ({exc})") from None
        if schema == 1:
            _check_v1_copies(payload, config, path)
            stored = {k: payload[k] for k in _TRAINING_KEYS if k in payload}
        else:
            stored = payload.get("training")
        training = None
        if stored:
            try:
                training = TrainingState(**stored)
            except TypeError as exc:
                raise CheckpointError(
                    f"{path}: its training state is incomplete ({exc}); it can predict but not resume, start a new run"
                ) from None
        return cls(config, weights, training, str(payload.get("medseg_version", "")), SCHEMA, path)


def _check_v1_copies(payload: dict[str, Any], config: Config, path: Path) -> None:
    """Schema 1 kept classes and preprocessing beside the config; they must say the same."""
    classes = payload.get("classes")
    if classes is not None and dict(classes) != dict(config.data.classes):
        raise CheckpointError(
            f"{path}: its classes {dict(classes)} differ from its config's data.classes "
            f"{dict(config.data.classes)}; the file was edited, use one written by `medseg train`"
        )
    preprocess = payload.get("preprocess")
    if preprocess is not None and preprocess != config.preprocess.model_dump(mode="json"):
        raise CheckpointError(
            f"{path}: its preprocessing differs from its config's preprocess section; "
            "the file was edited, use one written by `medseg train`"
        )


def checkpoint_file(path: Path | str) -> Path:
    """The file a checkpoint argument means: a run folder's best.pt (else latest.pt), or the file itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found; pass a run folder (with best.pt) or a .pt file "
            "that `medseg train` wrote (train one with `medseg train --config CONFIG`)"
        )
    return path


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically and durably (fsync, then rename)."""
    with atomic_path(Path(path), durable=True) as tmp:
        try:
            with open(tmp, "wb") as handle:  # a file object: a full disk is an OSError, not torch's RuntimeError
                torch.save(checkpoint.to_payload(), handle)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # torch's error names no file
    return Path(path)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a medseg checkpoint safely (weights_only); errors say what is wrong and what to do."""
    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects that could run code ({exc}). "
            "medseg checkpoints hold only tensors and plain values; use a checkpoint written by `medseg train`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({exc}); it may be truncated, retrain or copy it again"
        ) from None
    return Checkpoint.from_payload(payload, path)
