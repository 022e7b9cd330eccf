"""Benchmark: how long the `medseg` command takes to answer, against a bare `python -c pass`.

Run from the repository root: ``python bench/cli_startup.py``. Prints a table and writes
bench/results/cli_startup.json. Every figure is the wall time of a fresh process, as a
user starting the command sees it; each round times every case once, in turn, with
``python -c pass`` (the interpreter's own start-up) in the same round, and the median over
the rounds is reported, absolute and as a multiple of that baseline. The first round is
a warm-up (cold file cache) and is not counted.

- ``medseg --version``, ``medseg --help``, ``medseg predict --help``: the parser alone.
  Goal: under 0.3 s each (the parser imports no torch, numpy, pydantic: tests/test_cli.py).
- ``medseg info small.nii.gz``: a 32x32x16 int16 NIfTI volume, written here. Goal: under 1 s.
- ``medseg predict`` start-up: from launching the process until the first scan starts,
  i.e. after the interpreter, torch and MONAI are imported, the checkpoint is loaded and
  its model built, the input discovered and the output folder prepared. Measured without
  touching the code under test or its environment: the child process is
  ``python -c HOOK predict ...``, where HOOK wraps ``medseg.pipeline.segment_scan`` (the
  function the batch loop calls once per scan) so it prints the wall clock when it is
  entered and when it returns, then runs ``medseg.cli.main`` as the console script does.
  Start-up is the first timestamp minus the parent's clock just before it started the
  process. The input is one 128x128 PNG; the checkpoint is a U-Net of the shape of
  configs/unet_em.yaml (16 features, depth 4, batch norm, dropout), trained here for
  one step (loading cost, not accuracy, matters). Also reported: the scan itself, the
  tail after it (predictions.json, the review page, interpreter exit) and the whole
  run, so ``whole - scan`` is the start-up a "one tiny scan minus its per-scan time"
  measure would give (start-up plus tail). Goal: start-up under 3 s. Where the start-up
  goes is timed in another process (PHASES): importing torch, MONAI and the rest of what
  predict imports, load_checkpoint twice (the second call pays no one-time import cost,
  so the difference is what the first call imported) and making the Predictor.

The commands run through the ``medseg`` console script beside this interpreter (else
``python -m medseg``), from a temporary folder, so the code timed is whatever ``medseg``
this interpreter imports (PYTHONPATH included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOALS_S = {"version": 0.3, "help": 0.3, "predict_help": 0.3, "info_nifti": 1.0, "predict_startup": 3.0}

HOOK = r"""
import sys, time
import medseg.pipeline as pipeline
from medseg.cli import main

_segment_scan = pipeline.segment_scan

def timed(*args, **kwargs):
    print(f"BENCH scan-start {time.time():.6f}", file=sys.stderr, flush=True)
    try:
        return _segment_scan(*args, **kwargs)
    finally:
        print(f"BENCH scan-end {time.time():.6f}", file=sys.stderr, flush=True)

pipeline.segment_scan = timed
sys.argv[0] = "medseg"
sys.exit(main(sys.argv[1:]))
"""


PHASES = r"""
import json, sys, time
from pathlib import Path
laps, last = {}, time.perf_counter()

def lap(name):
    global last
    now = time.perf_counter()
    laps[name] = now - last
    last = now

import torch; lap("import_torch")
import monai; lap("import_monai")
import medseg.inference.predictor, medseg.pipeline; lap("import_medseg_rest")
from medseg.training.checkpoint import load_checkpoint
load_checkpoint(Path(sys.argv[1])); lap("load_checkpoint_first")
laps["dynamo_imported_by_first_load"] = "torch._dynamo" in sys.modules
load_checkpoint(Path(sys.argv[1])); lap("load_checkpoint_again")
medseg.inference.predictor.Predictor(Path(sys.argv[1]), device="cpu"); lap("predictor")
print(json.dumps(laps))
"""


def launcher() -> list[str]:
    """The `medseg` console script installed beside this interpreter, else ``python -m medseg``."""
    script = Path(sys.executable).parent / "medseg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medseg"]


def wall(argv: list[str], cwd: Path) -> float:
    """Seconds from start to exit of one process; its output is discarded, a failure stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return elapsed


def predict_run(argv: list[str], cwd: Path) -> dict[str, float]:
    """One `medseg predict` through HOOK: start-up, first scan, tail and whole run, in seconds."""
    launched = time.time()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", HOOK, *argv], cwd=cwd, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"medseg {' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    stamps = dict(line.split()[1:] for line in result.stderr.splitlines() if line.startswith("BENCH "))
    scan_start, scan_end = float(stamps["scan-start"]), float(stamps["scan-end"])
    return {
        "startup": scan_start - launched,
        "scan": scan_end - scan_start,
        "tail": whole - (scan_end - launched),
        "whole": whole,
    }


def predict_phases(checkpoint: Path, cwd: Path) -> dict[str, float]:
    """Where predict's start-up goes, timed inside one process (PHASES): its imports, the first and a
    second load_checkpoint (the difference is one-time import cost), then a Predictor."""
    result = subprocess.run(
        [sys.executable, "-c", PHASES, str(checkpoint)], cwd=cwd, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def make_fixtures(work: Path) -> dict[str, Path]:
    """A small NIfTI volume, one 128x128 PNG scan and a checkpoint of configs/unet_em.yaml's model shape."""
    import numpy as np
    from PIL import Image

    from medseg.data import phantoms
    from medseg.config import config_from_dict
    from medseg.training.loop import train

    nifti = phantoms.write_nifti(np.zeros((32, 32, 16), np.int16), np.diag([0.8, 0.8, 2.0, 1.0]), work / "small.nii.gz")
    em = phantoms.em_phantom(shape=(128, 128, 4), cells=20, seed=1)
    phantoms.write_png_sequence(em.image, work / "train" / "images", prefix="s")
    phantoms.write_png_sequence(em.label, work / "train" / "labels", prefix="s")
    scans = work / "scans"
    scans.mkdir()
    Image.fromarray(em.image[..., 0].astype(np.uint8).T).save(scans / "scan_em.png")
    config = config_from_dict(
        {
            "name": "bench",
            "data": {
                "images": str(work / "train" / "images"),
                "labels": str(work / "train" / "labels"),
                "classes": {"membrane": 0, "cell": 255},
                "split": {"mode": "cases", "train": ["s0", "s1", "s2"], "val": ["s3"]},
            },
            "model": {
                "name": "unet",
                "spatial_dims": 2,
                "features": 16,
                "depth": 4,
                "options": {"batch_norm": True, "dropout": 0.2},
            },
            "augment": {"enabled": False},
            "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "patch_size": [128, 128]},
            "output_dir": str(work / "runs"),
        }
    )
    run_dir = train(config, progress=False).run_dir
    return {"nifti": nifti, "scans": scans, "checkpoint": run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="counted rounds of the quick commands (default 7)")
    parser.add_argument("--predict-rounds", type=int, default=3, help="counted rounds of predict (default 3)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "cli_startup.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medseg-bench-cli-"))
    try:
        fixtures = make_fixtures(work)
        medseg = launcher()
        quick = {
            "python_pass": [sys.executable, "-c", "pass"],
            "version": [*medseg, "--version"],
            "help": [*medseg, "--help"],
            "predict_help": [*medseg, "predict", "--help"],
            "info_nifti": [*medseg, "info", str(fixtures["nifti"])],
        }
        times: dict[str, list[float]] = {name: [] for name in quick}
        for r in range(args.rounds + 1):
            for name, argv in quick.items():
                elapsed = wall(argv, work)
                if r:  # round 0 warms the file cache
                    times[name].append(elapsed)
        runs = []
        for r in range(args.predict_rounds + 1):
            run = predict_run(
                [
                    "predict",
                    "--checkpoint",
                    str(fixtures["checkpoint"]),
                    "--input",
                    str(fixtures["scans"]),
                    "--output",
                    str(work / f"out{r}"),
                    "--device",
                    "cpu",
                ],
                work,
            )
            if r:  # round 0 warms the file cache
                runs.append(run)
        phases = [predict_phases(fixtures["checkpoint"], work) for _ in range(args.predict_rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    baseline = statistics.median(times["python_pass"])
    median = {name: statistics.median(values) for name, values in times.items()}
    predict = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["predict_startup"] = predict["startup"]
    phase = {key: statistics.median(p[key] for p in phases) for key in phases[0] if not key.startswith("dynamo")}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "launcher": " ".join(Path(part).name for part in medseg),
        "rounds": args.rounds,
        "predict_rounds": args.predict_rounds,
        "seconds": {name: [round(x, 4) for x in values] for name, values in times.items()},
        "predict_seconds": [{key: round(value, 3) for key, value in run.items()} for run in runs],
        "median_seconds": {name: round(value, 4) for name, value in median.items()},
        "predict_median_seconds": {key: round(value, 3) for key, value in predict.items()},
        "predict_phases_seconds": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()} for p in phases
        ],
        "predict_phases_median_seconds": {key: round(value, 3) for key, value in phase.items()},
        "ratio_to_python_pass": {name: round(value / baseline, 1) for name, value in median.items()},
        "goals_seconds": GOALS_S,
        "goals_met": {name: median[name] < goal for name, goal in GOALS_S.items()},
    }
    print(json.dumps(result, indent=2))
    print(f"\n{'case':<22}{'median':>10}{'x python -c pass':>18}{'goal':>8}")
    for name, value in median.items():
        goal = GOALS_S.get(name)
        mark = "" if goal is None else f"< {goal:g} s {'met' if value < goal else 'MISSED'}"
        print(f"{name:<22}{value:>9.3f}s{value / baseline:>17.1f}x  {mark}")
    print(
        f"predict, one 128x128 scan: start-up {predict['startup']:.2f} s, scan {predict['scan']:.2f} s, "
        f"tail {predict['tail']:.2f} s, whole {predict['whole']:.2f} s"
    )
    print(
        "predict start-up, by phase (one process): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in phase.items())
        + f"; torch._dynamo imported by the first load_checkpoint: {phases[0]['dynamo_imported_by_first_load']}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
