"""One update per batch: the optimiser, its learning-rate schedule, the fp16 loss scaler and gradient clipping.

The schedule runs on a `RunClock`, which measures how far a run is by steps or, with a time
budget, by time (whichever is further), so the poly schedule reaches zero when the budget
ends however fast the machine is. The time is wall-clock time, or with
``train.time_budget_clock: cpu`` the CPU time of the training process (all its threads), which
a busy shared machine does not eat into: a budget of CPU minutes buys the same number of
steps whether the machine is idle or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from medseg.config import TrainConfig
from medseg.errors import ConfigError

__all__ = ["RunClock", "Optimization", "check_resume_clock"]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.monotonic, "cpu": time.process_time}


class RunClock:
    """How far a run is: by steps, or by time when a time budget is set (whichever is
    further), so the poly schedule reaches zero when the budget ends. ``now`` is the clock:
    wall time (time.monotonic) or the process's CPU time (time.process_time)."""

    def __init__(
        self,
        total_steps: int,
        budget_minutes: float | None,
        elapsed_before: float = 0.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.budget = budget_minutes * 60.0 if budget_minutes else None
        self.now = now
        self.start = now() - elapsed_before

    @classmethod
    def from_config(cls, train: TrainConfig, elapsed_before: float = 0.0) -> RunClock:
        """The clock of a run of ``train.epochs`` epochs within ``train.time_budget_minutes`` on
        ``train.time_budget_clock``; elapsed_before: the seconds a resumed run had already spent."""
        total = train.epochs * train.steps_per_epoch
        return cls(total, train.time_budget_minutes, elapsed_before, CLOCKS[train.time_budget_clock])

    @property
    def elapsed(self) -> float:
        return self.now() - self.start

    @property
    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget

    def fraction(self, step: int) -> float:
        done = step / self.total_steps
        if self.budget is not None:
            done = max(done, self.elapsed / self.budget)
        return min(done, 1.0)


def check_resume_clock(stored: TrainConfig, train: TrainConfig, path: Path) -> None:
    """A resumed run keeps the clock it started on: its spent time was counted on that clock,
    and wall and CPU seconds do not add up."""
    if stored.time_budget_clock != train.time_budget_clock:
        raise ConfigError(
            f"{path} counted its time budget in {stored.time_budget_clock} time, but the config says "
            f"train.time_budget_clock {train.time_budget_clock}; resume with "
            f"--set train.time_budget_clock={stored.time_budget_clock}, or start a new run"
        )


@dataclass
class Optimization:
    """The optimiser, its schedule and loss scaler, stepped together once per batch.

    Example::

        optim = Optimization.from_config(model, config.train, clock, device, dtype)
        loss = criterion(model(images), targets)
        optim.step(loss, model)
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None

    @classmethod
    def from_config(
        cls, model: nn.Module, train: TrainConfig, clock: RunClock, device: torch.device, dtype: torch.dtype | None
    ) -> Optimization:
        """Adam, or SGD with Nesterov momentum; a poly or constant schedule; a loss scaler only for fp16."""
        if train.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(),
                lr=train.learning_rate,
                momentum=train.momentum,
                nesterov=True,
                weight_decay=train.weight_decay,
            )
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
        if train.schedule == "poly":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1.0 - clock.fraction(step)) ** 0.9)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return cls(optimizer, scheduler, scaler, train.grad_clip)

    def step(self, loss: torch.Tensor, model: nn.Module) -> None:
        """Back-propagate ``loss`` into fresh gradients, clip them, update the weights and the learning rate."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def steps(self) -> int:
        """Optimiser steps taken since the run began (resumes included)."""
        return self.scheduler.last_epoch

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """The optimizer, scheduler and scaler states, under the names `TrainingState` stores them."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dicts(self, optimizer: dict[str, Any], scheduler: dict[str, Any], scaler: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        self.scaler.load_state_dict(scaler)
