"""The best epoch so far and early stopping (``train.early_stop_patience``, ``train.early_stop_min_delta``).

Both judge the same score, the validation mean Dice over every class not named background,
but differently: the best checkpoint follows every gain, however small, while patience only
restarts on a gain of at least ``min_delta``, so noise cannot keep a stalled run going.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from medseg.config import TrainConfig

__all__ = ["EarlyStopping", "SCORE"]

SCORE = "mean_dice"
_NOT_SCORES = ("epoch", "step", "lr", "seconds")  # a row's bookkeeping, not what the best epoch scored


class EarlyStopping:
    """Keeps the best validation row and counts validations since the last real gain.

    Example::

        stopping = EarlyStopping.from_config(config.train)
        if stopping.update(row, epoch):  # a new best: save best.pt
            ...
        if stopping.should_stop:
            break
    """

    def __init__(self, patience: int | None, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}
        self.since_best = 0  # validations since the last gain of at least min_delta

    @classmethod
    def from_config(cls, train: TrainConfig) -> EarlyStopping:
        return cls(train.early_stop_patience, train.early_stop_min_delta)

    def replay(self, history: Sequence[Mapping[str, float]]) -> None:
        """Continue a resumed run: judge its saved history again, row by row, so the best epoch and
        the count of validations since the last real gain are where the run left them (a resume
        must not give a stalled run a fresh ``patience``)."""
        for row in history:
            if SCORE in row:
                self.update(row, int(row["epoch"]))

    def update(self, row: Mapping[str, float], epoch: int) -> bool:
        """Judge one validated epoch's row; True when it is the new best."""
        score = row[SCORE]
        if not score > self.best_metric:  # NaN (nothing scored) is no gain either
            self.since_best += 1
            return False
        improved = score > self.best_metric + self.min_delta
        self.best_metric, self.best_epoch = score, epoch
        self.best_metrics = {k: v for k, v in row.items() if k not in _NOT_SCORES}
        self.since_best = 0 if improved else self.since_best + 1
        return True

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience
