"""`medseg train --config CONFIG`: train a model; `--resume RUN_DIR` continues a run."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from medseg.cli.config import add_override_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a segmentation model from a config")
    parser.add_argument(
        "--config", type=Path, required=True, help="experiment config (YAML), e.g. configs/unet_em.yaml"
    )
    add_override_argument(parser)
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run folder that already holds a run")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides train.device)")
    parser.add_argument(
        "--fold",
        type=_fold,
        metavar="all|N",
        help="cross-validation (data.split.mode kfold): train every fold ('all') or fold N, each into "
        "RUN/fold-N (RUN: output_dir/name), a folder medseg predict averages; with --resume RUN, finished "
        "folds are kept. Unlike nnU-Net's fold 'all' (one model on every case), 'all' here means all k folds",
    )
    parser.set_defaults(func=run)


def _fold(text: str) -> str | int:
    if text == "all":
        return text
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'all' or a fold number (0, 1, ...)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.training.loop import train

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    if args.fold is not None:
        from medseg.training.folds import train_folds

        folds = train_folds(config, args.fold, resume=args.resume, overwrite=args.overwrite)
        print("\n" + "\n".join(folds.summary(args.config)))
        return 0
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result.run_dir is None:
        return 0
    print(f"\nTrained {config.model.name} for {result.epochs_run} epoch(s) in {result.run_dir}")
    if result.best_metrics:
        scores = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.best_metrics.items()) if k != "train_loss")
        print(f"Best epoch {result.best_epoch}: {scores}")
    print(f"Checkpoint: {result.run_dir / 'best.pt'}  (latest: {result.run_dir / 'latest.pt'})")
    print(f"Metrics per epoch: {result.run_dir / 'metrics.csv'}; curves: {result.run_dir / 'learning_curves.png'}")
    return 0
