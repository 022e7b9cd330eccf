"""Where the per-scan tasks run: Prefect's thread pool (default) or a Dask cluster.

Threads share one model in one process, which suits one GPU or a CPU whose cores torch
already uses. Dask (``pip install 'medseg[dask]'``) spreads scans over worker
processes, on this machine (a local cluster, scheduler on 127.0.0.1 only) or on an
existing cluster given by address; each worker process loads the model once. With
GPUs, a local cluster gets one single-threaded worker per GPU and worker N uses cuda:N
(see model_cache.worker_device); on an existing cluster, start one worker per GPU,
e.g. ``CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1``.

Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers to hand freed memory back
to the system between tasks. That also pins glibc's mmap threshold at 128 KiB, so every
array of a scan becomes a fresh mmap with its page faults, and medseg's per-scan pipeline
ran twice as slow in a Dask worker as in a thread (BENCHMARKS.md, "Nightly batch"). A
medseg worker holds one model and reuses buffers of the same few sizes, so a local
cluster's workers keep glibc's defaults (see README for an external cluster).

A local cluster serves no dashboard. Dask's scheduler always opens an HTTP port (health
and metrics); with ``dashboard_address=None`` alone it takes :8787 on the scheduler's
host, where a second run or another Dask user would collide with it, so it is put on a
free loopback port instead. The link prefect-dask logs there answers 404: no dashboard.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from medseg.errors import ConfigError
from medseg.device import gpu_count

__all__ = ["DASK_INSTALL", "build_task_runner", "in_flight", "local_cluster", "require_dask"]

DASK_INSTALL = "pip install 'medseg[dask]'"


def require_dask() -> Any:
    """prefect-dask's DaskTaskRunner, or a ConfigError with the install command (checked at start)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(
            f"task_runner 'dask' needs prefect-dask, which is not installed ({exc}); install it with: {DASK_INSTALL}"
        ) from None
    return DaskTaskRunner


def build_task_runner(kind: str, workers: int | None = None, address: str | None = None) -> TaskRunner:
    """A fresh task runner of ``kind`` ('threads' or 'dask')."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=_worker_count(kind, workers, address))
    dask_runner = require_dask()  # before anything else: its absence is the first thing to say
    if address:
        return dask_runner(address=address)
    return dask_runner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "n_workers": _worker_count(kind, workers, address),
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,  # no dashboard ...
            "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},  # ... and its HTTP port not on :8787
        },
    )


def in_flight(kind: str, workers: int | None = None, address: str | None = None) -> int:
    """How many scans the flow keeps handed out at once: twice the workers, so that none
    waits while the flow hands out the next scan, and no more, so that a batch whose output
    stops taking writes stops after at most that many more tries. An existing Dask cluster
    whose size the flow does not know (no ``workers`` given) gets 64."""
    count = _worker_count(kind, workers, address)
    return 64 if count is None else 2 * count


def _worker_count(kind: str, workers: int | None, address: str | None) -> int | None:
    """The threads, or the local Dask worker processes, a run gets (None: an existing cluster's own)."""
    if kind == "threads":
        return workers or 2
    if address:
        return workers
    return workers or gpu_count() or min(2, os.cpu_count() or 1)


def local_cluster(**kwargs: Any) -> Any:
    """A distributed.LocalCluster whose worker processes keep glibc's default malloc tuning (see above)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(**kwargs)  # its nannies read the setting here, as they start
