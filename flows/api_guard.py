"""The Prefect API shows a run; it is not part of it. Calls to it are bounded, and an outage costs one warning.

A segment-study run's product is on disk: masks, predictions.json, metrics, the review
page. The Prefect server only displays them, so a server restart or a network drop in
the middle of a run must cost no mask and no report. Left to itself, Prefect 3.8 makes
an outage expensive: an artifact call made by a client that has not connected yet fails
at once with a traceback, one that has is retried for about a minute and then raises;
each task-state event is retried for about 7 s, then dropped with a warning and an error
line that carries the whole event (dozens of lines for one night). This module is
medseg's one place for that:

- ``GUARD.call(what, fn)`` makes one API call of the run. A call that cannot reach the
  API is tried again every few seconds until ``patience`` seconds after the outage began;
  then the run gives up on the API: this call and every later one are skipped at once,
  with one warning line that says what was not published and where the same facts are
  on disk. Any other error (a bad request, a bug) is raised as usual.
- ``quiet_outage_noise()`` folds Prefect's per-event connection warnings and errors into
  the guard: the first starts the outage clock with one info line, the rest are dropped.
  Task states sent while the API is away are lost to the UI (the files have them).

The flow run's own state is set by Prefect's engine, with Prefect's retries (about a
minute per call). The summary artifact is the run's last API call and the guard waits
for it up to ``patience``, so when it lands the API is there for the final state too; if
the API stays away longer, the run is left Running on the server and the crash
automation of the deployment marks it when its heartbeats stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger
from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

__all__ = ["API_PATIENCE_S", "GUARD", "ApiGuard", "quiet_outage_noise", "unreachable_reason"]

API_PATIENCE_S = 300.0  # long enough for a server restart or upgrade; the local work is done by then
RETRY_EVERY_S = 5.0
ATTEMPT_TIMEOUT_S = 10.0  # one attempt; Prefect's default (60 s) would overrun a short patience

T = TypeVar("T")


def unreachable_reason(exc: BaseException) -> str | None:
    """Why ``exc`` means the API could not be reached (short text), or None for any other error.

    Transport failures (refused, reset, timed out, DNS) and 5xx answers from a proxy or
    a restarting server count; a 4xx answer is a request the server understood and refused.
    """
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}" if exc.response.status_code >= 500 else None
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


class ApiGuard:
    """One process's view of the Prefect API during a run: up, away since when, given up on or not."""

    def __init__(
        self,
        patience: float = API_PATIENCE_S,
        retry_every: float = RETRY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.patience = patience
        self.retry_every = retry_every
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.where = "the output folder"
        self.down_since: float | None = None
        self.last_failure: float | None = None
        self.gave_up = False
        self.skipped: list[str] = []

    def start_run(self, where: str, patience: float | None = None) -> None:
        """Forget any earlier outage; ``where`` (the output folder) is named in the warning."""
        with self._lock:
            self.where = where
            self.patience = API_PATIENCE_S if patience is None else patience
            self.down_since = self.last_failure = None
            self.gave_up = False
            self.skipped = []

    def __getstate__(self) -> dict[str, Any]:
        """Picklable without its lock: Prefect ships a flow's function, with the globals it uses, to Dask workers."""
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` (an API call), retried while the API is unreachable and patience lasts; None once skipped."""
        while True:
            if self.gave_up:
                self.skipped.append(what)
                _logger().debug("%s skipped: the Prefect API is unreachable", what)
                return None
            try:
                with temporary_settings(
                    {PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: ATTEMPT_TIMEOUT_S}
                ):  # one quick attempt; this loop owns the retries and their bound
                    result = fn()
            except Exception as exc:
                reason = unreachable_reason(exc)
                if reason is None:
                    raise
                self.unreachable(reason)
                left = self._deadline() - self._clock()
                if left <= 0:
                    self._give_up(what, reason)
                    return None
                self._sleep(min(self.retry_every, left))
                continue
            self.reachable()
            return result

    def unreachable(self, reason: str) -> None:
        """Note a failed contact with the API; the first of an outage starts its clock with one info line.

        An outage with no failure for ``patience`` seconds is over: a process that makes no
        guarded call (a Dask worker) learns of the API's return only that way.
        """
        now = self._clock()
        with self._lock:
            new = self.down_since is None or (
                self.last_failure is not None and now - self.last_failure > self.patience and not self.gave_up
            )
            if new:
                self.down_since = now
            self.last_failure = now
        if new:
            _logger().info(
                "Prefect API unreachable (%s); the run goes on: masks and reports are written to %s as usual, "
                "task states and logs meanwhile are lost to the UI, artifacts wait up to %.0f s for it",
                reason,
                self.where,
                self.patience,
            )

    def reachable(self) -> None:
        """A call got through: an outage, if any, is over."""
        with self._lock:
            since, self.down_since, self.last_failure = self.down_since, None, None
        if since is not None:
            _logger().info("Prefect API reachable again after %.0f s", self._clock() - since)

    def _deadline(self) -> float:
        assert self.down_since is not None
        return self.down_since + self.patience

    def _give_up(self, what: str, reason: str) -> None:
        with self._lock:
            if self.gave_up:
                return
            self.gave_up = True
            self.skipped.append(what)
        _logger().warning(
            "Prefect API unreachable for %.0f s (%s): %s and any later artifact of this run are skipped; "
            "predictions.json, metrics and review.html in %s have the same facts",
            self._clock() - (self.down_since or self._clock()),
            reason,
            what,
            self.where,
        )


GUARD = ApiGuard()  # one per process: Prefect's logging hooks below report into it


class _FoldEventNoise(logging.Filter):
    """Prefect's events client: each event it cannot send costs a warning plus an error line with the event.

    The first such warning of an outage becomes the guard's one info line; the rest, and
    the EventsWorker errors that follow them while the API is away, are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect.events.clients" and str(record.msg).startswith("Unable to connect"):
            args = record.args if isinstance(record.args, tuple) else ()
            GUARD.unreachable(f"event stream {args[0]}: {args[1]}" if len(args) >= 2 else record.getMessage())
            return False
        if record.name == "prefect._internal.concurrency" and GUARD.down:
            args = record.args if isinstance(record.args, tuple) else ()
            return not (args and args[0] == "EventsWorker")
        return True


_FILTER = _FoldEventNoise()
_NOISY_LOGGERS = ("prefect.events.clients", "prefect._internal.concurrency")


def quiet_outage_noise() -> None:
    """Fold Prefect's per-event outage messages into the guard (idempotent; per process)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow or task run (the line shows in the run's log), else medseg's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("medseg.flows")
