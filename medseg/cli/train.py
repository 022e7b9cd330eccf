"""`medseg train --config CONFIG`: train a model; `--resume RUN_DIR` continues a run.

`medseg train --images DIR --labels DIR [--name N]` (or --csv / --dataset) plans the config from
the data first (as `medseg plan` does) and writes it, with its fingerprint, into the run folder.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from medseg.cli.config import add_override_argument
from medseg.cli.plan import add_source_arguments

# The planned config and its fingerprint in a run folder planned by `medseg train --images`.
RUN_CONFIG, RUN_FINGERPRINT = "config.yaml", "fingerprint.json"
# Options that only planning reads: given with --config they would be silently ignored, so they are refused.
_PLANNING_ONLY = ("labels", "root", "name", "modality", "memory_gb", "minutes")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmentation model from a config, or plan one from the data and train it",
        description="Train from --config, or from a data source (--images/--labels, --csv or --dataset): then the "
        "config is planned from the data as by `medseg plan` and written into the run folder.",
    )
    parser.add_argument("--config", type=Path, help="experiment config (YAML), e.g. configs/unet_em.yaml")
    add_source_arguments(parser, required=False)
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


def _config(args: argparse.Namespace, overrides: list[str]):
    """The config to train: the file given, the run folder's own (resuming a planned run), or a new plan."""
    from medseg.config import load_config
    from medseg.errors import ConfigError

    planning = args.images is not None or args.csv is not None or args.dataset is not None
    if args.config is not None and planning:
        raise ConfigError("give --config or a data source (--images, --csv, --dataset), not both")
    if args.config is not None:
        planning_only = [f"--{key.replace('_', '-')}" for key in _PLANNING_ONLY if getattr(args, key) is not None]
        if planning_only:
            raise ConfigError(
                f"{planning_only[0]} plans a config from a data source; with --config, set it in the config "
                "or with --set (e.g. --set name=NAME)"
            )
        return load_config(args.config, overrides)
    if not planning:
        raise ConfigError("give --config CONFIG, or a data source to plan from: --images DIR --labels DIR")
    if args.resume is not None:
        planned_config = args.resume / RUN_CONFIG
        if not planned_config.is_file():
            raise ConfigError(f"{args.resume}: no {RUN_CONFIG}; resume a run that was planned by medseg train --images")
        return load_config(planned_config, overrides)
    return _plan_into_run_folder(args, overrides)


def _plan_into_run_folder(args: argparse.Namespace, overrides: list[str]):
    from medseg.cli.plan import default_name, describe, planned_from_args
    from medseg.plan import write_plan
    from medseg.training.loop import prepare_run_dir

    args.overrides = overrides
    planned = planned_from_args(args, default_name(args), Path("runs"))
    config = planned.config
    run_dir = prepare_run_dir(config, overwrite=args.overwrite)  # refuses what training would, before writing
    path = write_plan(planned, run_dir / RUN_CONFIG, run_dir / RUN_FINGERPRINT, command="medseg train --images")
    print(f"Planned {path} (fingerprint: {RUN_FINGERPRINT} beside it):")
    print("\n".join(describe(planned)))
    return config


def run(args: argparse.Namespace) -> int:
    from medseg.training.loop import train

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    config = _config(args, overrides)
    args.run_dir = args.resume or config.output_dir / config.name  # for the interrupt hint
    if args.fold is not None:
        from medseg.training.folds import train_folds

        folds = train_folds(config, args.fold, resume=args.resume, overwrite=args.overwrite)
        print("\n" + "\n".join(folds.summary(args.config or args.run_dir / RUN_CONFIG)))
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
