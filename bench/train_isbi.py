"""Train models on ISBI 2012 EM for the same wall-clock budget and score slices 25-29.

Each model trains from its config in configs/ (unet_em, segnet_em, fcn8s_em) with
`train.time_budget_minutes` set to the budget, and the reference is a plain MONAI
BasicUNet with flips only, trained by the same loop for the same budget, so every ratio
is measured in one run on one machine. The figures are the training loop's last
validation and, for the best checkpoint, what `medseg predict` writes (the reader,
preprocessing, sliding window and inverse a user gets), without and with mirroring
test-time augmentation (`--tta`; outside the budget, it costs 2^(mirrored axes) times the
inference), plus the same on training slices 0-4 (how well the model fits what it trained
on). Each score also splits the pixel error by where the wrong pixels lie: within 1 or 2 px
of a reference membrane edge (boundary placement) or farther (a membrane missed or invented), and
gives the ISBI 2012 challenge's own "pixel error" (1 - maximal F-score of the cell
pixels over thresholds), which is the figure the U-Net paper reports and is not the
misclassified fraction. Prints a table and writes JSON.

    python bench/train_isbi.py --budget-minutes 30 --models unet
    python bench/train_isbi.py --budget-minutes 10            # all four
    python bench/train_isbi.py --score runs/bench/bench_unet  # score a finished run again
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
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.training.checkpoint import load_checkpoint  # noqa: E402
from medseg.config import Config, load_config  # noqa: E402
from medseg.data.datasets import Case, find_cases, split_cases  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.ingest import load  # noqa: E402
from medseg.ingest.labels import load_label  # noqa: E402
from medseg.evaluation.metrics import (  # noqa: E402
    ISBI_THRESHOLDS,
    confusion_counts,
    isbi_counts,
    isbi_pixel_error,
    mean_scores,
    overlap_scores,
)
from medseg.models import register_model  # noqa: E402
from medseg.training.loop import train  # noqa: E402
from medseg.data.transforms import label_to_index  # noqa: E402

CONFIGS = {
    "unet": "unet_em.yaml",
    "segnet": "segnet_em.yaml",
    "fcn8s": "fcn8s_em.yaml",
    "monai_basicunet": "unet_em.yaml",
}
# The reference: MONAI's BasicUNet at its default width, augmented with flips only and
# trained plainly (no weight averaging).
FLIPS_ONLY = [
    "augment.sigma=0",
    "augment.rotate_degrees=0",
    "augment.shift=0",
    "augment.scale=[1.0,1.0]",
    "augment.brightness=0",
    "augment.contrast=0",
    "augment.gamma=0",
    "augment.p_flip=0.5",
    "train.ema_decay=null",
]


@register_model("monai_basicunet")
def _monai_basicunet(
    spatial_dims: int, in_channels: int, out_channels: int, features: int = 32, depth: int | None = None
):
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels)
    net.size_divisor = 16
    return net


def edge_errors(mask: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Errors within 1 and 2 px of a reference class boundary, as fractions of all pixels.

    They separate boundary placement (a membrane drawn a pixel wider or narrower than the
    annotator drew it) from errors of substance (a membrane missed or invented).
    """
    wrong = mask != reference
    row = {}
    for reach in (1, 2):
        size = 2 * reach + 1
        near = ndimage.maximum_filter(reference, size) != ndimage.minimum_filter(reference, size)
        row[f"error_within_{reach}px_of_edge"] = float((wrong & near).mean())
    return row


def score_predictions(predictor: Predictor, cases: list[Case]) -> dict[str, float]:
    """Scores of the predictor's masks, as `medseg predict` makes them, on these cases,
    plus the challenge's pixel error from its probabilities."""
    classes = predictor.classes
    values = list(classes.values())
    foreground = np.asarray(values) > 0
    rows = []
    isbi = np.zeros((len(ISBI_THRESHOLDS), 3))
    for case in cases:
        scan = load(case.images[0])
        prediction = predictor.predict(scan, probabilities=True)
        mask = prediction.mask
        reference = load_label(case.label, scan, values).array[0]
        isbi += isbi_counts(prediction.probabilities[foreground].astype(np.float32).sum(0), reference)
        counts = confusion_counts(label_to_index(mask, values), label_to_index(reference, values), len(values))
        row = overlap_scores(counts, list(classes))
        for i, name in enumerate(classes):  # a model that draws classes too thick shows here
            row[f"fraction_{name}"] = counts[:, i].sum() / counts.sum()
            row[f"reference_fraction_{name}"] = counts[i].sum() / counts.sum()
        row.update(edge_errors(mask, reference))
        rows.append(row)
    result = {k: round(float(v), 4) for k, v in mean_scores(rows).items()}
    error, threshold = isbi_pixel_error(isbi)
    return {**result, "isbi_pixel_error": round(error, 4), "isbi_threshold": round(threshold, 2)}


def scores(run_dir: Path, config: Config) -> dict[str, dict[str, float]]:
    """The best checkpoint on slices 25-29 without and with TTA, and on as many training
    slices (0-4, "fit"), which tells whether a model is limited by fitting or by generalising."""
    predictor = Predictor(run_dir, device="auto", tta=False)
    train_cases, val_cases = split_cases(find_cases(config.data), config.data.split)
    result = {"predict": score_predictions(predictor, val_cases)}
    predictor.tta = True
    result["predict_tta"] = score_predictions(predictor, val_cases)
    predictor.tta = False
    result["predict_fit"] = score_predictions(predictor, train_cases[: len(val_cases)])
    return result


def run_model(name: str, budget: float, out_dir: Path, extra: list[str]) -> dict:
    overrides = [
        f"name=bench_{name}",
        f"output_dir={out_dir}",
        f"train.time_budget_minutes={budget}",
        "train.epochs=10000",
        "train.early_stop_patience=null",
        *extra,
    ]
    if name == "monai_basicunet":
        overrides += ["model.name=monai_basicunet", "model.options={}", *FLIPS_ONLY]
    config = load_config(REPO / "configs" / CONFIGS[name], overrides)
    start = time.monotonic()
    result = train(config, overwrite=True, progress=False)
    final = {k: v for k, v in result.history[-1].items()}
    steps = int(final["step"])
    return {
        "model": name,
        "config": CONFIGS[name],
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "wall_seconds": round(time.monotonic() - start, 1),
        "epochs": result.epochs_run,
        "steps": steps,
        "best_epoch": result.best_epoch,
        "best": {k: round(v, 4) for k, v in result.best_metrics.items()},
        "final": {k: round(v, 4) for k, v in final.items() if k.startswith(("dice", "iou", "pixel", "mean"))},
        **scores(result.run_dir, config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--models", default="unet,segnet,fcn8s,monai_basicunet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_isbi.json")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config overrides for every model"
    )
    parser.add_argument(
        "--score",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="only score existing run folders (their best.pt), no training",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.score:
        for run_dir in args.score:
            config = load_checkpoint(run_dir / "best.pt").config
            print(json.dumps({"run": str(run_dir), **scores(run_dir, config)}), flush=True)
        return
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    results = []
    for name in args.models.split(","):
        print(f"training {name} for {args.budget_minutes} min ...", flush=True)
        results.append(run_model(name, args.budget_minutes, args.runs, args.overrides))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "budget_minutes": args.budget_minutes,
        "overrides": args.overrides,
        "validation": "ISBI 2012 train slices 25-29",
        "results": results,
    }
    reference = next((r for r in results if r["model"] == "monai_basicunet"), None)
    print(
        f"\n{'model':<16}{'params':>10}{'steps':>7}  {'scored':<22}{'pixel error':>11}  {'membrane Dice':>13}"
        f"  {'membrane IoU':>12}  {'ISBI pixel error':>16}"
    )
    for r in results:
        for label, f in (
            ("last validation", r["final"]),
            ("predict (best.pt)", r["predict"]),
            ("predict --tta", r["predict_tta"]),
            ("fit: train slices 0-4", r["predict_fit"]),
        ):
            isbi = f"{f['isbi_pixel_error']:>16.4f}" if "isbi_pixel_error" in f else f"{'-':>16}"
            print(
                f"{r['model']:<16}{r['parameters']:>10}{r['steps']:>7}  {label:<22}{f['pixel_error']:>11.4f}"
                f"  {f['dice_membrane']:>13.4f}  {f['iou_membrane']:>12.4f}  {isbi}"
            )
        if reference and r is not reference:
            r["pixel_error_ratio_vs_reference"] = round(
                r["predict"]["pixel_error"] / reference["predict"]["pixel_error"], 3
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
