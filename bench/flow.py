"""Benchmark: what the segment-study flow costs on top of calling the predictor directly.

Run from the repository root: ``python bench/flow.py``. Prints a report and writes
bench/results/flow.json. Everything is generated: EM-like 2D scans (PNG, one file per
scan) and a small 2D U-Net (the shape of configs/unet_em.yaml at a quarter of its
width, trained for a few steps: inference cost, not accuracy, matters here).

Measured, with a temporary Prefect server (started once, before any timing):

- direct: ``medseg.pipeline.segment_scan`` for each scan with one ``Predictor``, in one
  loop (what `medseg predict` does, without Prefect). Neither timing includes loading
  the model: the direct loop's Predictor is made before the clock starts, and the flow's
  stays in its per-process cache from the warm-up run.
- flow, 1 worker: ``segment_study(..., workers=1)``: the same work through Prefect, one
  scan at a time, plus hashing, the skip record, the subflow, per-scan evaluation-free
  reporting, predictions.json and the artifacts. Its excess over direct, divided by
  the number of scans, is the per-scan overhead (the goal: at most 10% of direct).
- flow, default (2 threads): what a user gets.
- skip re-run: a second run over an unchanged folder of ``--skip-scans`` scans (every
  scan skipped; the model is never loaded).

Direct and flow runs take turns in rounds and the median is reported, so a busy spell
on a shared machine hits both alike. Torch runs one intra-op thread by default
(``--threads``): on a machine whose cores are busy with other work, two OpenMP threads
in the main thread (the direct loop) ran 4-15x slower than the same inference in a
worker thread (the flow's tasks), which measures the machine, not the flow; with one
thread both take the same time per scan.

Batches of two sizes separate the flow's fixed cost per run (creating the flow and
subflow runs, discovery, reports, artifacts; Prefect 3.8.8 also waits up to 1 s for
each flow run's heartbeat thread at exit) from its cost per extra scan (a task run,
hashing the inputs, the skip record).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="medseg-bench-flow-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")  # before Prefect is imported: never ~/.prefect

import flows  # noqa: E402  (sets Prefect's telemetry defaults before Prefect is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from medseg.data import phantoms  # noqa: E402
from medseg.config import config_from_dict  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.files import sha256_file  # noqa: E402
from medseg.ingest import discover  # noqa: E402
from medseg.pipeline import Job, segment_scan  # noqa: E402
from medseg.training.loop import train  # noqa: E402

from flows import model_cache  # noqa: E402
from flows.segment_study import segment_study  # noqa: E402

del flows


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


def time_direct(predictor: Predictor, scans: Path, out: Path) -> float:
    start = time.perf_counter()
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
    return time.perf_counter() - start


def time_flow(checkpoint: Path, scans: Path, out: Path, workers: int | None) -> float:
    start = time.perf_counter()
    summary = segment_study(input_dir=scans, output_dir=out, checkpoint=checkpoint, workers=workers)
    elapsed = time.perf_counter() - start
    assert summary.counts["failed"] == 0, summary
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=20, help="scans in the large timed batch (default 20)")
    parser.add_argument("--small", type=int, default=4, help="scans in the small timed batch (default 4)")
    parser.add_argument("--size", type=int, default=256, help="scan side in pixels (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--skip-scans", type=int, default=100, help="scans in the skip re-run (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see above)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "flow.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {"large": args.scans, "small": args.small}

    try:
        checkpoint = make_model(WORK / "model")
        folders = {name: make_scans(WORK / name, n, args.size) for name, n in sizes.items()}
        many = make_scans(WORK / "many", args.skip_scans, 128, seed=1)
        with prefect_test_harness(server_startup_timeout=180):
            segment_study(
                input_dir=folders["small"], output_dir=WORK / "warmup", checkpoint=checkpoint
            )  # first-run costs
            predictor = Predictor(
                checkpoint
            )  # the flow's model stays cached from the warm-up: neither timing loads one
            times: dict[str, list[float]] = {}
            for r in range(args.rounds):
                for name, folder in folders.items():
                    for label, run in (
                        ("direct", lambda out: time_direct(predictor, folder, out)),
                        ("flow_1_worker", lambda out: time_flow(checkpoint, folder, out, 1)),
                        ("flow_default", lambda out: time_flow(checkpoint, folder, out, None)),
                    ):
                        key = f"{label}_{name}"
                        times.setdefault(key, []).append(run(WORK / f"{key}_{r}"))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
            first = time_flow(checkpoint, many, WORK / "many-out", None)
            loads = model_cache.loads()
            skip_start = time.perf_counter()
            summary = segment_study(input_dir=many, output_dir=WORK / "many-out", checkpoint=checkpoint)
            skip = time.perf_counter() - skip_start
            assert summary.counts == {"written": 0, "skipped": args.skip_scans, "failed": 0}, summary.counts
            assert model_cache.loads() == loads, "a skip-everything run loaded a model"
    finally:
        shutil.rmtree(WORK, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    n_large, n_small = args.scans, args.small
    excess = {name: med[f"flow_1_worker_{name}"] - med[f"direct_{name}"] for name in sizes}
    marginal = (excess["large"] - excess["small"]) / (n_large - n_small)  # per extra scan
    fixed = excess["small"] - n_small * marginal  # per run, whatever its size
    direct_per_scan = med["direct_large"] / n_large
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "prefect": __import__("prefect").__version__,
        },
        "scans": sizes,
        "scan_size": [args.size, args.size],
        "rounds": args.rounds,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "direct_per_scan_ms": round(1000 * direct_per_scan, 1),
        "flow_overhead": {
            "per_scan_ms": round(1000 * marginal, 1),
            "per_scan_fraction_of_direct": round(marginal / direct_per_scan, 3),
            "fixed_per_run_s": round(fixed, 2),
            "total_fraction_at_large_batch": round(excess["large"] / med["direct_large"], 3),
        },
        "flow_default_vs_direct_fraction_at_large_batch": round(
            (med["flow_default_large"] - med["direct_large"]) / med["direct_large"], 3
        ),
        "skip_rerun": {
            "scans": args.skip_scans,
            "scan_size": [128, 128],
            "first_run_seconds": round(first, 2),
            "rerun_seconds": round(skip, 2),
            "per_scan_ms": round(1000 * skip / args.skip_scans, 1),
            "models_loaded": 0,
        },
    }
    print(json.dumps(result, indent=2))
    overhead = result["flow_overhead"]
    print(
        f"\nDirect: {result['direct_per_scan_ms']} ms per {args.size}x{args.size} scan. Flow (1 worker): "
        f"+{overhead['per_scan_ms']} ms per scan ({100 * overhead['per_scan_fraction_of_direct']:.1f}% of direct) "
        f"plus {overhead['fixed_per_run_s']} s per run; {100 * overhead['total_fraction_at_large_batch']:.1f}% in all "
        f"at {n_large} scans. Flow (default, 2 threads): "
        f"{100 * result['flow_default_vs_direct_fraction_at_large_batch']:+.1f}% vs direct at {n_large} scans.\n"
        f"Skip-everything re-run of {args.skip_scans} scans: {skip:.2f} s "
        f"({result['skip_rerun']['per_scan_ms']} ms/scan), no model loaded."
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
