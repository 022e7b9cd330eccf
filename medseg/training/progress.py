"""What a running training shows: a bar in a terminal, log lines everywhere else.

A job's log file or a Prefect worker has no terminal, and a tqdm bar there is either
nothing or one endless line of carriage returns. Without a bar, progress is a log line
with the loss, the speed and the time left every ``train.log_every_seconds`` seconds or
``train.log_every_steps`` steps (whichever comes first), and a line per epoch.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Mapping, TextIO

from tqdm import tqdm

from medseg.config import TrainConfig

__all__ = ["Progress", "duration"]

log = logging.getLogger(__name__)


class Progress:
    """Training progress of rank 0 (the other ranks show nothing).

    Args:
        total_steps: the steps this call will run, for the bar and the time left.
        bar: a tqdm bar on ``stream``; otherwise log lines.
        every_steps, every_seconds: a step line once either many steps or seconds have
            passed since the last one (None: that rule is off; both None: epoch lines only).
        lines: False for ranks other than 0, which show nothing at all.
        now: the clock, in seconds (tests pass their own).
    """

    def __init__(
        self,
        total_steps: int,
        bar: bool,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        lines: bool = True,
        stream: TextIO | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total_steps
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=not bar, file=stream or sys.stderr)
        self.lines = lines and not bar
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.now = now
        self.done = 0
        self.started = self.last_time = now()
        self.last_step = 0

    @classmethod
    def for_run(
        cls, progress: bool | None, is_main: bool, total_steps: int, train: TrainConfig, stream: TextIO | None = None
    ) -> Progress:
        """progress: True a bar, False log lines, None a bar when ``stream`` (stderr) is a terminal."""
        stream = stream or sys.stderr
        bar = (_is_terminal(stream) if progress is None else progress) and is_main
        return cls(total_steps, bar, train.log_every_steps, train.log_every_seconds, is_main, stream)

    def step(self, loss: float, lr: float) -> None:
        self.done += 1
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        if not self.lines:
            return
        now = self.now()
        due = (self.every_steps is not None and self.done - self.last_step >= self.every_steps) or (
            self.every_seconds is not None and now - self.last_time >= self.every_seconds
        )
        if due:
            rate = self.done / max(now - self.started, 1e-9)
            log.info(
                "step %d/%d: loss %.4f, lr %.2e, %.2f steps/s, %s left",
                self.done,
                self.total,
                loss,
                lr,
                rate,
                duration((self.total - self.done) / rate),
            )
            self.last_step, self.last_time = self.done, now

    def epoch(self, row: Mapping[str, float]) -> None:
        if self.lines:
            log.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """A short human duration: '45 s', '3 min 20 s', '2 h 05 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
