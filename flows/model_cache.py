"""One Predictor per worker process, loaded on first use and shared by every scan it segments.

Loading a checkpoint (and moving the model to its device) costs far more than a small
scan's inference, so tasks must not load it per scan; and tasks cannot receive the model
as an argument, because a Dask worker would have it pickled to it for every task. The
cache is keyed by (checkpoint file, its mtime, device, tta): a retrained checkpoint at
the same path gets a fresh model, and only one model stays in memory per process.
"""

from __future__ import annotations

import threading
from pathlib import Path


from medseg.inference.predictor import Predictor
from medseg.device import gpu_count

__all__ = ["get_predictor", "loads", "worker_device"]

_lock = threading.Lock()
_cache: dict[tuple[str, int, str, bool | None], Predictor] = {}
_loads = 0


def get_predictor(checkpoint: Path, device: str = "auto", tta: bool | None = None) -> Predictor:
    """The process's Predictor for this checkpoint file and settings (loaded once, thread-safe)."""
    global _loads
    device = worker_device(device)
    key = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns, device, tta)
    with _lock:  # threads of one process wait for the single load instead of each loading
        predictor = _cache.get(key)
        if predictor is None:
            _cache.clear()
            predictor = _cache[key] = Predictor(checkpoint, device=device, tta=tta)
            _loads += 1
        return predictor


def loads() -> int:
    """How many models this process has loaded (the benchmark and tests check it)."""
    return _loads


def worker_device(device: str) -> str:
    """One GPU per Dask worker: with 'auto', several GPUs and a local cluster, worker N takes cuda:N.

    Workers of a local cluster are named 0, 1, ...; with as many workers as GPUs each gets
    its own. Elsewhere (thread pool, one GPU, an explicit device) the device is unchanged.
    """
    if device != "auto" or gpu_count() < 2:
        return device
    index = _dask_worker_index()
    return device if index is None else f"cuda:{index % gpu_count()}"


def _dask_worker_index() -> int | None:
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        name = get_worker().name
    except ValueError:  # not inside a Dask worker
        return None
    return name if isinstance(name, int) else None
