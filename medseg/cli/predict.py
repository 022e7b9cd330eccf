"""`medseg predict`: segment every scan in a file or folder with a trained checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.constants import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="segment scans with a trained checkpoint and write masks")
    parser.add_argument("--checkpoint", type=Path, required=True, help="run folder (uses best.pt) or checkpoint file")
    parser.add_argument(
        "--input", type=Path, required=True, help="a scan file, a DICOM series folder, or a folder tree"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for the masks (outside the input folder)")
    parser.add_argument("--tta", action="store_true", help="average predictions over mirrored inputs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="arithmetic of the forward passes (default: the checkpoint's infer.precision, auto)",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose masks are already up to date")
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
    from medseg.inference.predictor import Predictor
    from medseg.pipeline import check_disjoint, segment_folder

    check_disjoint(args.input, args.output)  # before the model loads: a wrong --output fails at once
    predictor = Predictor(
        args.checkpoint,
        device=args.device,
        tta=args.tta or None,
        precision=args.precision,
        overlap=args.overlap,
        keep_largest=args.keep_largest,
        fill_holes=args.fill_holes,
        memory_budget_mb=args.memory_budget,
    )
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
