"""Train the planned model on msd_hippocampus_dev for a CPU-time budget and score a held-out fold.

The model is what `medseg plan --dataset msd_hippocampus_dev --modality MR --minutes M` writes
for the budget (the short-budget recipe under 4 hours: nnU-Net's 3d_fullres plan at half its
width, trained with Adam; see BENCHMARKS.md), trained on folds 1-4 of data_manifest.csv's
5-fold split for a budget of *CPU* minutes (`train.time_budget_clock=cpu`: the training
process's CPU time over all its threads, so a busy shared machine slows the run down but
does not shrink it; the poly schedule spans the budget). Epochs are shortened to
`--steps-per-epoch` steps so that the curve has enough points to measure its spread; the
validation after each epoch scores fold 0 (12 cases, sliding window without mirroring).

Figures, for each budget:

- mean Dice per class on fold 0 as `medseg predict` makes the masks (reader, preprocessing,
  sliding window with mirroring TTA, inverse), for `latest.pt` (the end of the schedule: the
  honest figure, fold 0 chose nothing) and `best.pt` (chosen on fold 0, so optimistic);
- the validation curve's spread: mean and largest |change| of each class's Dice between
  consecutive validations over the second half of the run, the largest drop anywhere after
  the first quarter, and best minus last mean Dice;
- inference seconds per case (wall and CPU) with and without TTA.

nnU-Net v2's published, fully trained figure on MSD Task04 is about 0.90 (anterior,
label 1) / 0.89 (posterior, label 2) Dice; the issue's goal is to come within 0.03 at 30
CPU-minutes on 2 cores.

    MEDSEG_DATA_DIR=../shared/data python bench/plan_hippocampus.py --minutes 15 30 --threads 1
    python bench/plan_hippocampus.py --minutes 15 --set train.ema_decay=null --tag no_ema  # the ablation
    python bench/plan_hippocampus.py --minutes 15 --config configs/msd_hippocampus_dev.yaml --tag sgd  # nnU-Net's
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.cli import main as medseg  # noqa: E402
from medseg.config import Config, load_config  # noqa: E402
from medseg.data.datasets import Case, find_cases, split_cases  # noqa: E402
from medseg.data.transforms import label_to_index  # noqa: E402
from medseg.evaluation.metrics import confusion_counts, mean_scores, overlap_scores  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.ingest import load  # noqa: E402
from medseg.ingest.labels import load_label  # noqa: E402
from medseg.training.loop import train  # noqa: E402

NNUNET = {"class_1": 0.90, "class_2": 0.89}  # anterior, posterior: nnU-Net v2 fully trained (published)


def curve_spread(history: list[dict[str, float]], classes: list[str]) -> dict[str, float]:
    """How much the validation Dice moves between consecutive validations.

    The first half of a run climbs, so the step-to-step change is measured over the second
    half; the largest drop is taken after the first quarter (an early dip is learning, a late
    one is the lottery the issue describes)."""
    rows = [r for r in history if "mean_dice" in r]
    out: dict[str, float] = {"validations": len(rows)}
    for key in [f"dice_{c}" for c in classes] + ["mean_dice"]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        steps = np.diff(values[len(values) // 2 :])
        late = np.diff(values[len(values) // 4 :])
        out[f"{key}_mean_abs_change"] = float(np.abs(steps).mean()) if steps.size else float("nan")
        out[f"{key}_max_abs_change"] = float(np.abs(steps).max()) if steps.size else float("nan")
        out[f"{key}_max_drop"] = float(max(0.0, -late.min())) if late.size else 0.0
    means = np.array([r["mean_dice"] for r in rows])
    out["best_minus_last_mean_dice"] = float(means.max() - means[-1])
    out["best_epoch"] = int(rows[int(means.argmax())]["epoch"])
    return out


def score(checkpoint: Path, cases: list[Case], tta: bool) -> dict[str, float]:
    """Mean Dice per class of the masks `medseg predict` would write, and seconds per case."""
    predictor = Predictor(checkpoint, device="cpu", tta=tta)
    values = list(predictor.classes.values())
    rows, wall, cpu = [], 0.0, 0.0
    for case in cases:
        scan = load(case.images[0])
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        mask = predictor.predict(scan).mask
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
        reference = load_label(case.label, scan, values).array[0]
        counts = confusion_counts(label_to_index(mask, values), label_to_index(reference, values), len(values))
        rows.append(overlap_scores(counts, list(predictor.classes)))
    result = {k: round(v, 4) for k, v in mean_scores(rows).items() if k.startswith("dice_") or k == "mean_dice"}
    return {
        **result,
        "seconds_per_case": round(wall / len(cases), 3),
        "cpu_seconds_per_case": round(cpu / len(cases), 3),
    }


def planned(minutes: float, folder: Path) -> Path:
    """The plan `medseg plan` makes for this dataset and a budget of ``minutes``."""
    path = folder / f"plan_{minutes:g}min.yaml"
    argv = ["plan", "--dataset", "msd_hippocampus_dev", "--modality", "MR", "--minutes", f"{minutes:g}"]
    if medseg([*argv, "--out", str(path), "--overwrite"]) != 0:
        raise SystemExit(f"medseg plan failed for {minutes} minutes")
    return path


def run_budget(minutes: float, args: argparse.Namespace) -> dict:
    name = f"hippocampus_{minutes:g}cpumin{'_' + args.tag if args.tag else ''}"
    source = args.config or planned(minutes, args.runs / "plans")
    overrides = [
        f"name={name}",
        f"output_dir={args.runs}",
        f"train.time_budget_minutes={minutes}",
        "train.time_budget_clock=cpu",
        "train.epochs=100000",
        f"train.steps_per_epoch={args.steps_per_epoch}",
        "train.log_every_seconds=120",
        *args.overrides,
    ]
    config: Config = load_config(source, overrides)
    classes = [c for c in config.data.classes if c != "background"]
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = train(config, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    _, held_out = split_cases(find_cases(config.data), config.data.split)
    last = result.history[-1]
    row = {
        "name": name,
        "cpu_minutes_budget": minutes,
        "config": str(source),
        "overrides": args.overrides,
        "train_wall_minutes": round(wall / 60, 2),
        "train_cpu_minutes": round(cpu / 60, 2),
        "epochs": result.epochs_run,
        "steps": int(last["step"]),
        "held_out_cases": len(held_out),
        "curve": [
            {
                k: round(v, 4)
                for k, v in r.items()
                if k in ("epoch", "step", "train_loss", "mean_dice") or k.startswith("dice_")
            }
            for r in result.history
        ],
        "spread": {k: round(v, 4) for k, v in curve_spread(result.history, classes).items()},
        "latest_tta": score(result.run_dir / "latest.pt", held_out, tta=True),
        "latest_no_tta": score(result.run_dir / "latest.pt", held_out, tta=False),
        "best_tta": score(result.run_dir / "best.pt", held_out, tta=True),
    }
    row["gap_to_nnunet"] = {c: round(NNUNET[c] - row["latest_tta"][f"dice_{c}"], 4) for c in NNUNET}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[15.0, 30.0], help="CPU-minute budgets")
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 uses a CPU-minute best here)")
    parser.add_argument("--config", type=Path, help="train this config instead of planning one per budget")
    parser.add_argument("--tag", default="", help="suffix of the run names and the results file")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    os.environ.setdefault("MEDSEG_DATA_DIR", str(REPO.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    out = args.out or REPO / "bench" / "results" / f"plan_hippocampus{'_' + args.tag if args.tag else ''}.json"
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
        "nnunet_reference": NNUNET,
        "runs": [],
    }
    for minutes in args.minutes:
        row = run_budget(minutes, args)
        report["runs"].append(row)
        report["load_average_after"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        summary = {k: row[k] for k in ("name", "train_wall_minutes", "epochs", "steps", "spread", "latest_tta")}
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
