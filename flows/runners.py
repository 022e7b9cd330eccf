"""Where the per-scan tasks run: Prefect's thread pool (default) or a Dask cluster.

Threads share one model in one process, which suits one GPU or a CPU whose cores torch
already uses. Dask (``pip install 'medseg[dask]'``) spreads scans over worker
processes, on this machine (a local cluster, scheduler on 127.0.0.1 only) or on an
existing cluster given by address; each worker process loads the model once. With
GPUs, a local cluster gets one single-threaded worker per GPU and worker N uses cuda:N
(see model_cache.worker_device); on an existing cluster, start one worker per GPU,
e.g. ``CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1``.

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

__all__ = ["DASK_INSTALL", "build_task_runner", "require_dask"]

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
        return ThreadPoolTaskRunner(max_workers=workers or 2)
    dask_runner = require_dask()
    if address:
        return dask_runner(address=address)
    gpus = gpu_count()
    count = workers or gpus or min(2, os.cpu_count() or 1)
    return dask_runner(
        cluster_kwargs={
            "n_workers": count,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,  # no dashboard ...
            "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},  # ... and its HTTP port not on :8787
        }
    )
