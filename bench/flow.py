"""Benchmark: what the segment-study flow costs over `medseg predict`, and which task runner pays off when.

Run from the repository root: ``python bench/flow.py [--part overhead|runners|all]``. Prints
a report and writes bench/results/flow.json (overhead) and bench/results/flow_runners.json.
Everything is generated: EM-like 2D scans (PNG, one file per scan) and a small 2D U-Net
(the shape of configs/unet_em.yaml at a quarter of its width, trained for a few steps:
inference cost, not accuracy, matters here). One temporary Prefect server (started
before any timing) serves every flow run.

overhead: the same folders through
- direct: ``medseg.pipeline.segment_scan`` per scan with one ``Predictor``, in a loop
  (no discovery, no reports; the model is made before the clock starts);
- predict: ``medseg predict`` (in this process: same torch threads; it loads the model);
- flow, 1 worker / default (2 threads): ``segment_study`` (its model stays cached from a
  warm-up run).
Batches of two sizes separate each one's fixed cost per run from its cost per scan (the
slope); the flow's per-scan cost over predict's, measured in the same run, is the ratio
the issue asks for. Plus a skip-everything re-run of ``--skip-scans`` unchanged scans.

runners: threads (2) vs a local Dask cluster (2 worker processes, started by each run)
vs an external Dask cluster (a ``dask scheduler`` and two ``dask worker`` processes this
script starts and stops; its workers keep their model between runs, so its first run is
reported apart), at two batch sizes. A second external cluster keeps Dask's own worker
set-up (MALLOC_TRIM_THRESHOLD_=65536 from the nanny), to show what that costs per scan.
The fits T(n) = fixed + n * per_scan give the break-even batch size of each Dask runner
against threads (a local cluster: the external cluster's line plus its measured warm-up).
The local cluster's start alone (until its workers have joined) is timed too.

Runs take turns in rounds and the median is reported, so a busy spell on a shared machine
hits all alike. Torch runs one intra-op thread per scan (``--threads``; Dask's nanny sets
OMP_NUM_THREADS=1 in its workers): two scans at a time use the two cores in every runner.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Spawned Dask workers of a local cluster import this file again (as __mp_main__): they find the folder here.
WORK = Path(os.environ.get("MEDSEG_BENCH_FLOW_WORK") or tempfile.mkdtemp(prefix="medseg-bench-flow-"))
os.environ["MEDSEG_BENCH_FLOW_WORK"] = str(WORK)
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")  # before Prefect is imported: never ~/.prefect

import medseg_flows  # noqa: E402  (sets Prefect's telemetry defaults before Prefect is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from medseg.cli import main as medseg_main  # noqa: E402
from medseg.config import config_from_dict  # noqa: E402
from medseg.data import phantoms  # noqa: E402
from medseg.files import sha256_file  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.ingest import discover  # noqa: E402
from medseg.pipeline import Job, segment_scan  # noqa: E402
from medseg.training.loop import train  # noqa: E402

from medseg_flows import model_cache  # noqa: E402
from medseg_flows.runners import build_task_runner  # noqa: E402
from medseg_flows.segment_study import segment_study  # noqa: E402

del medseg_flows
BIN = Path(sys.executable).parent
SCAN_SECONDS: dict[str, list[float]] = {}  # per runner: the pipeline's time for each scan (predictions.json)


def make_scans(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` EM-like 2D scans, one PNG each (names end in a letter: single images, not a stack)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = phantoms.em_phantom(shape=(size, size, 4), cells=40, seed=seed).image
    rng = np.random.default_rng(seed)
    for i in range(count):
        plane = base[..., i % 4].astype(np.int16) + rng.integers(-8, 9, size=(size, size))
        Image.fromarray(np.clip(plane, 0, 255).astype(np.uint8).T).save(folder / f"scan{i:03d}_em.png")
    return folder


def make_model(root: Path) -> Path:
    em = phantoms.em_phantom(shape=(128, 128, 4), cells=20, seed=1)
    phantoms.write_png_sequence(em.image, root / "images", prefix="s")
    phantoms.write_png_sequence(em.label, root / "labels", prefix="s")
    config = config_from_dict(
        {
            "name": "bench",
            "data": {
                "images": str(root / "images"),
                "labels": str(root / "labels"),
                "classes": {"membrane": 0, "cell": 255},
                "split": {"mode": "cases", "train": ["s0", "s1", "s2"], "val": ["s3"]},
            },
            "model": {"name": "unet", "spatial_dims": 2, "features": 16, "depth": 4},
            "augment": {"enabled": False},
            "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_size": [128, 128]},
            "infer": {"overlap": 0.5, "sw_batch_size": 4},
            "output_dir": str(root / "runs"),
        }
    )
    return train(config, progress=False).run_dir


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def direct(predictor: Predictor, scans: Path, out: Path) -> None:
    out.mkdir(parents=True)  # what prepare_output does for predict and the flow (they check more)
    job = Job(
        out,
        predictor.checkpoint_file,
        sha256_file(predictor.checkpoint_file),
        predictor.classes,
        predictor.config.data.color,
        predictor.tta,
        overwrite=True,
    )
    for ref in discover(scans).scans:
        record = segment_scan(ref, job, lambda: predictor)
        assert record.status == "written", record


def predict(checkpoint: Path, scans: Path, out: Path) -> None:
    code = medseg_main(["predict", "--checkpoint", str(checkpoint), "--input", str(scans), "--output", str(out)])
    assert code == 0, f"medseg predict exited with {code}"


def flow(checkpoint: Path, scans: Path, out: Path, **options: object) -> None:
    summary = segment_study(input_dir=scans, output_dir=out, checkpoint=checkpoint, **options)
    assert summary.counts["failed"] == 0 and summary.counts["skipped"] == 0, summary


def fit(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(fixed seconds per run, seconds per scan) of the line through two (scans, seconds) points."""
    per_scan = (large[1] - small[1]) / (large[0] - small[0])
    return small[1] - small[0] * per_scan, per_scan


def rounds(
    runs: dict[str, Callable[[str, Path], None]], sizes: dict[str, int], n: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each run at each size, the runs taking turns round by round: (wall, to reports).

    "To reports" ends when predictions.json was written (the wall time where a run writes
    none). A flow run's wall time also holds Prefect's wait for its heartbeat thread, which
    sleeps in 1 s steps: it rounds every run up to a whole second, too coarse for a slope.
    """
    wall: dict[str, list[float]] = {}
    work: dict[str, list[float]] = {}
    for r in range(n):
        for size in sizes:
            for label, run in runs.items():
                key, out = f"{label}@{size}", WORK / f"{label}@{size}-{r}"
                started = time.time()
                wall.setdefault(key, []).append(timed(lambda: run(size, out)))
                report = out / "predictions.json"
                work.setdefault(key, []).append(report.stat().st_mtime - started if report.exists() else wall[key][-1])
                if report.exists():  # each scan's own load-predict-export time, wherever it ran
                    records = json.loads(report.read_text())["records"]
                    SCAN_SECONDS.setdefault(label, []).extend(record["seconds"] for record in records)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items()), flush=True)
    return wall, work


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def break_even_vs(base: tuple[float, float], other: tuple[float, float]) -> str:
    """Where ``other``'s line T(n) = fixed + n * per_scan crosses ``base``'s, said as which side wins."""
    (base_fixed, base_per), (fixed, per) = base, other
    saved = base_per - per  # seconds per scan that `other` saves
    if saved == 0 or (fixed - base_fixed) / saved < 1:
        return "always faster" if fixed <= base_fixed and saved >= 0 else "never faster"
    crossing = (fixed - base_fixed) / saved
    return f"faster from {crossing:.0f} scans on" if saved > 0 else f"faster below {crossing:.0f} scans"


def part_overhead(args: argparse.Namespace, checkpoint: Path) -> dict:
    sizes = {"small": args.small, "large": args.scans}
    folders = {name: make_scans(WORK / f"scans-{name}", n, args.size) for name, n in sizes.items()}
    flow(checkpoint, folders["small"], WORK / "warmup")  # first-run costs; the flow's model stays cached
    predictor = Predictor(checkpoint)
    runs = {
        "direct": lambda size, out: direct(predictor, folders[size], out),
        "predict": lambda size, out: predict(checkpoint, folders[size], out),
        "flow_1_worker": lambda size, out: flow(checkpoint, folders[size], out, workers=1),
        "flow_default": lambda size, out: flow(checkpoint, folders[size], out),
    }
    wall, work = rounds(runs, sizes, args.rounds)
    med = medians(work)
    lines = {label: fit((args.small, med[f"{label}@small"]), (args.scans, med[f"{label}@large"])) for label in runs}
    many = make_scans(WORK / "many", args.skip_scans, 128, seed=1)
    flow(checkpoint, many, WORK / "many-out")
    loads = model_cache.loads()
    skip = timed(lambda: segment_study(input_dir=many, output_dir=WORK / "many-out", checkpoint=checkpoint))
    assert model_cache.loads() == loads, "a skip-everything run loaded a model"
    per = {label: per_scan for label, (_, per_scan) in lines.items()}
    return {
        "scans": sizes,
        "scan_size": [args.size, args.size],
        "median_wall_seconds": {k: round(v, 3) for k, v in medians(wall).items()},
        "seconds_to_reports": {k: [round(x, 3) for x in v] for k, v in work.items()},
        "fixed_seconds_per_run": {label: round(fixed, 2) for label, (fixed, _) in lines.items()},
        "per_scan_ms": {label: round(1000 * v, 1) for label, v in per.items()},
        "flow_1_worker_per_scan_over_predict": round(per["flow_1_worker"] / per["predict"], 3),
        "flow_default_per_scan_over_predict": round(per["flow_default"] / per["predict"], 3),
        "flow_1_worker_per_scan_over_direct": round(per["flow_1_worker"] / per["direct"], 3),
        "scan_pipeline_ms": {
            label: round(1000 * statistics.median(SCAN_SECONDS[label]), 1) for label in runs if label != "direct"
        },
        "skip_rerun": {"scans": args.skip_scans, "seconds": round(skip, 2), "models_loaded": 0},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DASK_MALLOC_DEFAULTS = """# Dask's nanny would set MALLOC_TRIM_THRESHOLD_=65536 in its workers (README, Scaling out)
distributed:
  nanny:
    pre-spawn-environ:
      MALLOC_TRIM_THRESHOLD_: null
"""


def start_external_cluster(workers: int, malloc_trim: bool = False) -> tuple[str, list[subprocess.Popen]]:
    """A ``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes on loopback.

    Configured as the README says (glibc's malloc defaults in the workers), unless ``malloc_trim``.
    """
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not malloc_trim:
        (WORK / "dask-config").mkdir(exist_ok=True)
        (WORK / "dask-config" / "medseg.yaml").write_text(DASK_MALLOC_DEFAULTS)
        env["DASK_CONFIG"] = str(WORK / "dask-config")
    log = open(WORK / "dask.log", "ab")
    scheduler = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler += ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]  # its HTTP port off :8787 too
    processes = [subprocess.Popen(scheduler, env=env, stdout=log, stderr=log, start_new_session=True)]
    worker = [str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1"]
    processes += [
        subprocess.Popen(worker, env=env, stdout=log, stderr=log, start_new_session=True) for _ in range(workers)
    ]
    from distributed import Client

    with Client(address, timeout=120) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, processes


def stop_processes(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # workers before the scheduler: reversed start order
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def part_runners(args: argparse.Namespace, checkpoint: Path) -> dict:
    sizes = {"small": args.runner_small, "large": args.runner_scans}
    folders = {name: make_scans(WORK / f"runner-scans-{name}", n, args.size, seed=2) for name, n in sizes.items()}
    starts = []
    for _ in range(args.rounds):  # a local cluster's start alone, until its workers have joined
        runner = build_task_runner("dask", 2)
        with runner:
            starts.append(timed(lambda: runner.client.wait_for_workers(2)))
    address, processes = start_external_cluster(2)
    trim_address, trim_processes = start_external_cluster(2, malloc_trim=True)  # as Dask sets its workers up
    try:
        cold = timed(
            lambda: flow(checkpoint, folders["large"], WORK / "ext-cold", task_runner="dask", dask_address=address)
        )  # its workers import medseg and load the model; later runs find both done
        flow(checkpoint, folders["small"], WORK / "ext-trim-cold", task_runner="dask", dask_address=trim_address)
        runs = {
            "threads": lambda size, out: flow(checkpoint, folders[size], out, workers=2),
            "local_dask": lambda size, out: flow(checkpoint, folders[size], out, task_runner="dask", workers=2),
            "external_dask": lambda size, out: flow(
                checkpoint, folders[size], out, task_runner="dask", dask_address=address
            ),
            "external_dask_malloc_trim": lambda size, out: flow(
                checkpoint, folders[size], out, task_runner="dask", dask_address=trim_address
            ),
        }
        wall, work = rounds(runs, sizes, args.rounds)
    finally:
        stop_processes(trim_processes[::-1] + processes[::-1])
    med = medians(work)
    lines = {
        label: fit((sizes["small"], med[f"{label}@small"]), (sizes["large"], med[f"{label}@large"])) for label in runs
    }
    # A local cluster's workers are an external cluster's, started afresh by each run: its per-scan rate is
    # the external one's and its extra fixed cost the warm-up. Its own two-point slope sits on 10-30 s runs
    # whose start-up varies by seconds on a shared machine, too noisy to give a break-even.
    warmup = statistics.median(med[f"local_dask@{size}"] - med[f"external_dask@{size}"] for size in sizes)
    modelled = {**lines, "local_dask": (lines["external_dask"][0] + warmup, lines["external_dask"][1])}
    break_even = {label: break_even_vs(lines["threads"], modelled[label]) for label in runs if label != "threads"}
    return {
        "scans": sizes,
        "scan_size": [args.size, args.size],
        "median_wall_seconds": {k: round(v, 3) for k, v in medians(wall).items()},
        "seconds_to_reports": {k: [round(x, 3) for x in v] for k, v in work.items()},
        "fixed_seconds_per_run": {label: round(fixed, 2) for label, (fixed, _) in lines.items()},
        "per_scan_ms": {label: round(1000 * per, 1) for label, (_, per) in lines.items()},
        "scan_pipeline_ms": {label: round(1000 * statistics.median(SCAN_SECONDS[label]), 1) for label in runs},
        "local_cluster_start_seconds": round(statistics.median(starts), 2),
        "local_cluster_warmup_seconds": round(warmup, 2),  # start + workers importing medseg, loading the model
        "external_first_run_seconds": round(cold, 2),
        "break_even_vs_threads": break_even,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "prefect": __import__("prefect").__version__,
        "distributed": __import__("distributed").__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["overhead", "runners", "all"], default="all")
    parser.add_argument("--scans", type=int, default=40, help="overhead: scans in the large batch (default 40)")
    parser.add_argument("--small", type=int, default=4, help="overhead: scans in the small batch (default 4)")
    parser.add_argument("--runner-scans", type=int, default=30, help="runners: large batch (default 30)")
    parser.add_argument("--runner-small", type=int, default=10, help="runners: small batch (default 10)")
    parser.add_argument("--size", type=int, default=256, help="scan side in pixels (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--skip-scans", type=int, default=100, help="scans in the skip re-run (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see above)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = ["overhead", "runners"] if args.part == "all" else [args.part]
    results = {}
    try:
        checkpoint = make_model(WORK / "model")
        with prefect_test_harness(server_startup_timeout=180):
            for part in parts:
                measure = part_overhead if part == "overhead" else part_runners
                start = {"date": datetime.date.today().isoformat(), "load_average_at_start": os.getloadavg()}
                results[part] = {**start, **measure(args, checkpoint), "machine": machine()}
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    for part, result in results.items():
        path = args.results / ("flow.json" if part == "overhead" else "flow_runners.json")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
