"""Touching nuclei: does the U-Net paper's treatment of touching objects separate them?

Trains the same small 2D U-Net for the same number of steps on synthetic nuclei
(``medseg.data.nuclei``: textured blobs of varying size, about a third of them in
touching pairs, blur and noise; SYNTHETIC, there is no real nuclei data on this machine)
in four ways, and scores each on held-out images:

- ``union_ce``: cross-entropy on the union of the masks (one class map per image, what
  a conversion script gives; touching nuclei are one blob in the target);
- ``union_weighted_ce``: as above with the border weights medseg computed before issue
  #19, from connected components of the class map (touching nuclei get no weight at
  their contact, being one component);
- ``separated_ce``: the per-image layout read as instances, touching borders set to
  background in the target, plain cross-entropy;
- ``separated_weighted_ce``: the same plus the paper's weight map from the true instances.

Scores on the test images: the fraction of touching pairs separated (two touching true
instances are separated when their pixels fall mostly into two different 8-connected
components of the predicted foreground; a nucleus mostly missed counts as not
separated), object F1 at IoU 0.5 (8-connected components against true nuclei), and
foreground Dice against the union of the true masks. Also times the weight map on a
512 x 512 image of about 100 nuclei.

    nice -n 10 python bench/touching_nuclei.py --steps 300
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
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.config import config_from_dict  # noqa: E402
from medseg.data.nuclei import NucleiImage, nuclei_image, write_instance_case  # noqa: E402
from medseg.data.weights import border_weight_map, separate_touching, touching_pairs  # noqa: E402
from medseg.evaluation.instances import object_counts, separation_scores  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.ingest import load, ref_for_path  # noqa: E402
from medseg.training.loop import train  # noqa: E402

ARMS = ("union_ce", "union_weighted_ce", "separated_ce", "separated_weighted_ce")
IMAGE = {"shape": (256, 256), "nuclei": 60, "radius": (5.0, 12.0)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def make_data(root: Path, n_train: int, n_val: int, n_test: int) -> dict[str, NucleiImage]:
    """The per-image layout (instances) and flat union class maps of the same images."""
    made: dict[str, NucleiImage] = {}
    for i in range(n_train + n_val + n_test):
        role = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        case = f"{role}{i:03d}"
        made[case] = nuclei_image(seed=1000 + i, **IMAGE)
        if role == "test":
            write_instance_case(root / "test", case, made[case])
            continue
        write_instance_case(root / "layout", case, made[case])
        (root / "union" / "images").mkdir(parents=True, exist_ok=True)
        (root / "union" / "labels").mkdir(parents=True, exist_ok=True)
        image = Image.open(root / "layout" / case / "images" / f"{case}.png")
        image.save(root / "union" / "images" / f"{case}.png")
        union = (made[case].instances > 0).astype(np.uint8).T
        Image.fromarray(union).save(root / "union" / "labels" / f"{case}.png")
    return made


def arm_config(arm: str, root: Path, out: Path, cases: dict[str, NucleiImage], steps: int, seed: int):
    train_ids = [c for c in cases if c.startswith("train")]
    val_ids = [c for c in cases if c.startswith("val")]
    union = arm.startswith("union")
    data = (
        {"images": str(root / "union" / "images"), "labels": str(root / "union" / "labels")}
        if union
        else {"images": str(root / "layout")}
    )
    per_epoch = 50
    return config_from_dict(
        {
            "name": arm,
            "data": {
                **data,
                "classes": {"background": 0, "nucleus": 1},
                "split": {"mode": "cases", "train": train_ids, "val": val_ids},
            },
            "model": {"name": "unet", "spatial_dims": 2, "features": 16, "depth": 3},
            "augment": {"rotate_degrees": 180, "sigma": 6.0},
            "train": {
                "epochs": max(1, steps // per_epoch),
                "steps_per_epoch": per_epoch,
                "batch_size": 4,
                "patch_size": [96, 96],
                "learning_rate": 1e-3,
                "loss": "weighted_ce" if arm.endswith("weighted_ce") else "ce",
                "border_class": "nucleus",
                "border_w0": 10.0,
                "border_sigma": 5.0,
                "val_every": 100000,  # validate once, after the last epoch: the score is on the test images
                "seed": seed,
                "device": "cpu",
            },
            "infer": {"sw_batch_size": 4},
            "output_dir": str(out),
        }
    )


def score(run_dir: Path, root: Path, cases: dict[str, NucleiImage]) -> dict[str, float]:
    predictor = Predictor(run_dir / "latest.pt", device="cpu")
    totals = {"pairs": 0, "separated": 0, "pair_missed": 0, "true_objects": 0, "predicted_objects": 0, "matched": 0}
    dices = []
    for case, truth in cases.items():
        if not case.startswith("test"):
            continue
        scan = load(ref_for_path(root / "test" / case / "images" / f"{case}.png"))
        foreground = predictor.predict(scan).mask == 1
        for key, value in {
            **separation_scores(truth.instances, foreground),
            **object_counts(truth.instances, foreground),
        }.items():
            totals[key] += value
        dices.append(dice(foreground, truth.instances > 0))
    return {
        **totals,
        "separated_fraction": round(totals["separated"] / max(totals["pairs"], 1), 4),
        "object_f1": round(2 * totals["matched"] / max(totals["true_objects"] + totals["predicted_objects"], 1), 4),
        "dice_union": round(float(np.mean(dices)), 4),
    }


def time_weights(repeats: int = 5) -> dict[str, float]:
    nuclei = nuclei_image(shape=(512, 512), nuclei=100, seed=7)
    separated = separate_touching(nuclei.instances)
    target = (separated > 0).astype(np.int64)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        border_weight_map(target, separated, 2, 10.0, 5.0)
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    separate_touching(nuclei.instances)
    separate = time.perf_counter() - start
    # The same map with each instance's distance transform over the whole image, for scale.
    start = time.perf_counter()
    d = np.stack([ndimage.distance_transform_edt(separated != i) for i in range(1, int(separated.max()) + 1)])
    d.partition(1, axis=0)
    balance = np.bincount(target.ravel(), minlength=2) / target.size
    whole = (balance.max() / balance)[target] + np.where(
        separated == 0, 10.0 * np.exp(-((d[0] + d[1]) ** 2) / 50.0), 0.0
    )
    whole_seconds = time.perf_counter() - start
    difference = float(np.abs(whole - border_weight_map(target, separated, 2, 10.0, 5.0)).max())
    return {
        "instances": int(nuclei.instances.max()),
        "touching_pairs": len(touching_pairs(nuclei.instances)),
        "weight_map_seconds_median": round(float(np.median(seconds)), 4),
        "separate_touching_seconds": round(separate, 4),
        "whole_image_transforms_seconds": round(whole_seconds, 3),
        "max_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per arm (the equal budget)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--train-cases", type=int, default=24)
    parser.add_argument("--val-cases", type=int, default=4)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "touching_nuclei")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "touching_nuclei.json")
    args = parser.parse_args()
    timing = time_weights()
    print(
        f"weight map, 512 x 512, {timing['instances']} nuclei: {timing['weight_map_seconds_median']:.3f} s "
        f"(whole-image transforms: {timing['whole_image_transforms_seconds']:.2f} s, "
        f"max difference {timing['max_difference']:.1e})"
    )
    cases = make_data(args.out / "data", args.train_cases, args.val_cases, args.test_cases)
    rows = []
    for arm in [a for a in args.arms.split(",") if a]:
        config = arm_config(arm, args.out / "data", args.out, cases, args.steps, args.seed)
        start, cpu = time.monotonic(), time.process_time()
        result = train(config, overwrite=True, progress=False)
        row = {
            "arm": arm,
            "steps": int(result.history[-1]["step"]),
            "wall_seconds": round(time.monotonic() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),  # the machine is shared: CPU time is the budget
            **score(result.run_dir, args.out / "data", cases),
        }
        print(json.dumps(row))
        rows.append(row)
    print(f"\n{'arm':24s} {'separated':>14s} {'object F1':>10s} {'Dice':>7s} {'steps':>6s} {'CPU s':>8s}")
    for r in rows:
        pairs = f"{r['separated']}/{r['pairs']} {r['separated_fraction']:.2f}"
        print(
            f"{r['arm']:24s} {pairs:>14s} {r['object_f1']:10.3f} {r['dice_union']:7.3f} "
            f"{r['steps']:6d} {r['cpu_seconds']:8.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": dt.date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "data": "synthetic nuclei (medseg.data.nuclei), not real images",
                "image": {k: list(v) if isinstance(v, tuple) else v for k, v in IMAGE.items()},
                "cases": {"train": args.train_cases, "val": args.val_cases, "test": args.test_cases},
                "weight_map_timing": timing,
                "arms": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
