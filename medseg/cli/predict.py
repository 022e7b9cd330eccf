"""`medseg predict`: segment every scan in a file or folder with a trained checkpoint or an ensemble of them,
or exactly the cases a run recorded (``--config C --split val``) or named ones (``--cases``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.constants import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="segment scans with a trained checkpoint and write masks")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="run folder (uses best.pt) or checkpoint file; several, or a run folder of folds "
        "(medseg train --fold all), average their class probabilities (an ensemble); default: the --config's run",
    )
    parser.add_argument("--input", type=Path, help="a scan file, a DICOM series folder, or a folder tree")
    parser.add_argument(
        "--config", type=Path, help="experiment config: its run folder is the checkpoint, its data the cases"
    )
    parser.add_argument(
        "--split",
        choices=("train", "val"),
        help="with --config: predict exactly the cases of this role in the run folder's split.json "
        "(a run of folds: each validation case by the fold that held it out)",
    )
    parser.add_argument("--cases", nargs="+", metavar="ID", help="with --config: predict these cases of its data")
    parser.add_argument("--output", type=Path, required=True, help="folder for the masks (outside the input folder)")
    parser.add_argument("--tta", action="store_true", help="average predictions over mirrored inputs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="arithmetic of the forward passes (default: the checkpoint's infer.precision, auto)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo scans whose masks are already up to date, and replace files at mask names medseg did not write",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=("nifti", "dicom-seg", "rtstruct", "tiff", "png"),
        help="mask format (repeatable); default per input: DICOM → NIfTI + DICOM SEG, "
        "NIfTI → NIfTI, TIFF → TIFF, PNG sequence → TIFF + PNGs, image → PNG; "
        "rtstruct (DICOM input only): RT Structure Set contours for radiotherapy planning",
    )
    parser.add_argument("--overlap", type=float, help="sliding-window overlap (default: the checkpoint's, 0.5)")
    parser.add_argument(
        "--keep-largest",
        nargs="*",
        default=[],
        metavar="CLASS",
        help="keep only the largest component of these classes",
    )
    parser.add_argument("--fill-holes", nargs="*", default=[], metavar="CLASS", help="fill holes in these classes")
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="MB",
        help="the most one scan may take once decoded and in model space, in MB; larger scans are "
        "refused from their headers before decoding (default: a quarter of the available memory, "
        "at most 4096)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.pipeline import check_disjoint, segment_cases, segment_folder

    chosen = args.split is not None or bool(args.cases)
    if chosen and (args.config is None or args.input is not None):
        raise ConfigError("--split and --cases choose cases of a config's data: give --config CONFIG and no --input")
    if not chosen and (args.input is None or (args.checkpoint is None and args.config is None)):
        raise ConfigError(
            "give --input with --checkpoint RUN (or --config CONFIG), or --config CONFIG with --split or --cases"
        )
    if args.input is not None:
        check_disjoint(args.input, args.output)  # before the model loads: a wrong --output fails at once
    options = dict(
        device=args.device,
        tta=args.tta or None,
        precision=args.precision,
        overlap=args.overlap,
        keep_largest=args.keep_largest,
        fill_holes=args.fill_holes,
        memory_budget_mb=args.memory_budget,
    )
    config = None
    if args.config is not None:
        from medseg.config import load_config

        config = load_config(args.config)
    if chosen:
        from medseg.inference.selection import select_cases

        selection = select_cases(config, args.split, args.cases, args.checkpoint, **options)
        print(f"Predicting {selection.source}")
        report = segment_cases(selection.batch, args.output, args.formats, args.overwrite, None, selection.checkpoint)
    else:
        from medseg.inference.ensemble import load_predictor

        predictor = load_predictor(args.checkpoint or [config.output_dir / config.name], **options)
        report = segment_folder(predictor, args.input, args.output, args.formats, args.overwrite)
    counts = report.counts()
    for record in report.records:
        if record.status == "failed":
            print(f"FAILED {record.case}: {record.reason}")
        elif record.status == "skipped":
            print(f"skipped {record.case}: up to date")
    for orphan in report.orphans:
        print(
            f"orphan {orphan['case']}: its input {orphan['input'] or '(unknown)'} is gone; "
            f"kept {', '.join(orphan['outputs'])}"
        )
    print(
        f"{counts['written']} written, {counts['skipped']} skipped (up to date), {counts['failed']} failed; "
        f"masks in {args.output}"
    )
    if report.stopped:
        print(f"medseg predict: error: stopped early: {report.stopped}", file=sys.stderr)
        return 1
    print(f"Review page: {args.output / 'review.html'}  (or: medseg view {args.output})")
    return 1 if counts["failed"] else 0
