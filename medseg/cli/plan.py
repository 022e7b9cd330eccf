"""`medseg plan --images DIR --labels DIR [--out configs/NAME.yaml]`: a config that follows from the data.

The data-source options here are shared with `medseg train`, which plans and trains in one
command when given a source instead of a config.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from medseg.cli.config import add_override_argument

# Folder names that say nothing about the dataset (the name comes from the folder above them).
_GENERIC = {"images", "imagestr", "imagests", "image", "img", "imgs", "data", "train", "training", "scans", "raw"}


def add_source_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--images/--labels, --csv or --dataset (any source training reads), and the planning options."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--images", type=Path, metavar="DIR", help="folder of images (nnU-Net: case_0000.nii.gz ...)")
    source.add_argument("--csv", type=Path, metavar="FILE", help="CSV of image,label paths (and optionally case)")
    source.add_argument("--dataset", metavar="ID", help="a dataset of data_manifest.csv (fetched with medseg data)")
    parser.add_argument("--labels", type=Path, metavar="DIR", help="folder of masks named like their images")
    parser.add_argument("--root", type=Path, metavar="DIR", help="with --dataset: the folder datasets were fetched to")
    parser.add_argument("--name", help="the plan's and run's name (default: from the data folder)")
    parser.add_argument(
        "--modality",
        help="the modality of the images when their headers do not say (NIfTI, TIFF): CT gets CT "
        "normalisation; one for all channels or one per channel, e.g. CT or MR,MR",
    )
    parser.add_argument("--color", choices=("grey", "channels"), default="grey", help="RGB images as grey or channels")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        metavar="GB",
        help="memory one training step may take, counted in fp32 (default 10: nnU-Net's 128^3 patch at batch 2); "
        "the patch shrinks and the batch grows to fit it",
    )
    parser.add_argument(
        "--minutes", type=float, metavar="M", help="train for M minutes (the schedule spans them) instead of epochs"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="measure a labelled dataset and write a config that follows from it (nnU-Net's planning)",
        description="Fingerprint a labelled dataset (shapes, spacings, intensities, classes, objects) and write "
        "a commented config whose every value says which rule chose it, with the fingerprint as JSON beside it.",
    )
    add_source_arguments(parser, required=True)
    parser.add_argument("--out", type=Path, metavar="YAML", help="the config to write (default: configs/NAME.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace a config (and fingerprint) already there")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def default_name(args: argparse.Namespace) -> str:
    """--name, else the dataset id, the CSV's name or the image folder's (the one above a generic 'imagesTr')."""
    if args.name:
        return args.name
    if args.dataset:
        text = args.dataset
    elif args.csv:
        text = args.csv.stem
    else:
        folder = args.images.absolute()
        text = folder.parent.name if folder.name.lower() in _GENERIC and folder.parent.name else folder.name
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:64]
    return text or "plan"


def check_source(args: argparse.Namespace) -> None:
    """The source options fit together and name what exists, before any file is read."""
    from medseg.errors import ConfigError

    if args.labels is not None and args.images is None:
        raise ConfigError("--labels pairs masks with --images; give --images DIR too")
    if args.root is not None and args.dataset is None:
        raise ConfigError("--root is where --dataset was fetched to; give --dataset ID too")
    for flag, path in (("--images", args.images), ("--labels", args.labels), ("--root", args.root)):
        if path is not None and not path.is_dir():
            raise ConfigError(f"{flag} {path}: no such folder")
    if args.csv is not None and not args.csv.is_file():
        raise ConfigError(f"--csv {args.csv}: no such file")
    if args.images is not None and args.labels is None:
        raise ConfigError(f"--images {args.images} needs --labels DIR: planning measures the reference masks")
    for flag, value in (("--memory-gb", args.memory_gb), ("--minutes", args.minutes)):
        if value is not None and not 0 < value < 1e6:
            raise ConfigError(f"{flag} {value}: give a positive number")


def planned_from_args(args: argparse.Namespace, name: str, output_dir: Path) -> Any:
    """Fingerprint the source the arguments name and plan it (medseg.plan.Planned)."""
    from medseg.config import DataConfig
    from medseg.plan import DEFAULT_MEMORY_GB, PlanOptions, plan_dataset

    check_source(args)
    paths = {"images": args.images, "labels": args.labels, "csv": args.csv, "root": args.root}
    paths = {key: value.absolute() for key, value in paths.items() if value is not None}
    data = DataConfig(dataset=args.dataset, color=args.color, **paths)
    options = PlanOptions(
        name=name,
        data={"dataset": args.dataset, **paths},
        output_dir=output_dir.absolute(),
        color=args.color,
        memory_gb=args.memory_gb or DEFAULT_MEMORY_GB,
        minutes=args.minutes,
    )
    modality = [m.strip() for m in args.modality.split(",")] if args.modality else None
    return plan_dataset(data, options, modality, args.overrides)


def describe(planned: Any) -> list[str]:
    """What a person wants to see of a plan at a glance, one line each."""
    config = planned.config
    model, train = config.model, config.train
    sliced = model.spatial_dims == 2 and planned.fingerprint.spatial_dims == 3
    widths = [min(model.features * 2**level, model.options.get("max_features") or 10**9) for level in (0, model.depth)]
    lines = [
        f"  {model.spatial_dims}D U-Net, {model.depth + 1} levels, {widths[0]}-{widths[1]} features, "
        f"{model.options.get('norm')} norm",
        f"  patch {'x'.join(map(str, train.patch_size))}, batch {train.batch_size}"
        + (f", spacing {'x'.join(f'{s:g}' for s in config.preprocess.spacing)} mm" if config.preprocess.spacing else "")
        + (f", 2D on slices across axis {train.slice_axis}" if sliced else ""),
        f"  intensity {config.preprocess.intensity}, loss {train.loss}, classes {config.data.classes}",
    ]
    return lines + [f"NOTE: {note}" for note in planned.plan.notes]


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.plan import fingerprint_path_for, write_plan

    name = default_name(args)
    out = args.out or Path("configs") / f"{name}.yaml"
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: a config is a .yaml file; give --out configs/{name}.yaml")
    fingerprint = fingerprint_path_for(out)
    existing = [p for p in (out, fingerprint) if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it or --out another file")
    planned = planned_from_args(args, name, Path("runs"))
    write_plan(planned, out, fingerprint, command="medseg plan")
    print(f"Fingerprint of {len(planned.fingerprint.cases)} case(s): {fingerprint}")
    print(f"Plan: {out}")
    print("\n".join(describe(planned)))
    print(f"Train it: medseg train --config {out}")
    return 0
