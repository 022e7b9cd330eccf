"""Weight averaging (``train.ema_decay``): validate, checkpoint and predict with a moving average.

Small batches make the weights jump from step to step; their exponential moving average
segments more steadily. Training itself continues on the raw weights, so a checkpoint of an
averaged run holds both (the average as ``weights``, the raw ones for an exact resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from medseg.config import TrainConfig
from medseg.errors import ConfigError
from medseg.training.checkpoint import TrainingState
from medseg.training.distributed import unwrap

__all__ = ["WeightAverage", "ema_update", "check_resume_averaging"]


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The moving-average step for ``AveragedModel``, with the decay warmed up as
    min(decay, (1 + n) / (10 + n)) after n updates: a fixed 0.999 would keep half of the
    random initial weights for 700 steps, and an average over weights that far apart
    segments worse than either (measured: 0.17 pixel error after 700 steps on ISBI).
    Warmed up, the average weighs the steps so far by about (step / n) ** 9, mostly the last
    fifth of them, until n reaches (10 decay - 1) / (1 - decay) (4490 steps for 0.998);
    only then does ``decay`` itself set the span."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # BatchNorm's step counter
                a.copy_(c)

    return update


class WeightAverage:
    """The moving average of a model's weights and buffers, updated after every optimiser step.

    Example::

        average = WeightAverage.from_config(config.train, model)  # None when ema_decay is unset
        ...
        average.update(model)  # after optimizer.step()
        evaluate(average.module, ...)
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self._averaged = AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)

    @classmethod
    def from_config(cls, train: TrainConfig, model: nn.Module) -> WeightAverage | None:
        return cls(model, train.ema_decay) if train.ema_decay else None

    @property
    def module(self) -> nn.Module:
        """The averaged model: the weights validated, checkpointed and predicted with."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        return int(self._averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (DistributedDataParallel-wrapped or not) into the average."""
        self._averaged.update_parameters(unwrap(model))

    def load(self, weights: dict[str, torch.Tensor], updates: int | None) -> None:
        """Restore the average a checkpoint holds, with how many updates it has seen (for the warm-up)."""
        self.module.load_state_dict(weights)
        self._averaged.n_averaged.fill_(updates or 0)


def check_resume_averaging(state: TrainingState, stored: TrainConfig, train: TrainConfig, path: Path) -> None:
    """A resumed run keeps averaging as it started: the average cannot be rebuilt for a run
    that never kept one, and dropping it would validate different weights against the best.

    stored: the ``train`` section the run started with; train: the one resuming it.
    """
    if train.ema_decay and not state.averaged:
        raise ConfigError(
            f"{path} was trained without weight averaging, but train.ema_decay is "
            f"{train.ema_decay}; resume with --set train.ema_decay=null, or start a new run"
        )
    if state.averaged and not train.ema_decay:
        raise ConfigError(
            f"{path} was trained with weight averaging (train.ema_decay {stored.ema_decay}), but the config turns it "
            f"off; resume with --set train.ema_decay={stored.ema_decay}, or start a new run"
        )
