"""What a running training shows: a bar in a terminal, otherwise a log line per epoch."""

from __future__ import annotations

import logging
import sys
from typing import Mapping

from tqdm import tqdm

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    """Training progress of rank 0 (the other ranks show nothing).

    A tqdm bar over every step of this call, with the loss and learning rate; without the bar
    each epoch's row goes to the log instead.
    """

    def __init__(self, total_steps: int, bar: bool, lines: bool = True) -> None:
        self.lines = lines
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=not bar)

    @classmethod
    def for_run(cls, progress: bool | None, is_main: bool, total_steps: int) -> Progress:
        """progress: True a bar, False none, None a bar when stderr is a terminal."""
        bar = (sys.stderr.isatty() if progress is None else progress) and is_main
        return cls(total_steps, bar, lines=is_main)

    def step(self, loss: float, lr: float) -> None:
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def epoch(self, row: Mapping[str, float]) -> None:
        if self.bar.disable and self.lines:
            log.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))

    def close(self) -> None:
        self.bar.close()
