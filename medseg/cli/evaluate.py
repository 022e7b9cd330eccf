"""`medseg evaluate --pred DIR --ref DIR`: score predicted masks against reference masks."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from medseg.constants import CONVENTIONS, RESAMPLE_MODES
from medseg.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted masks against reference masks (Dice, IoU, pixel accuracy, HD95, surface Dice)",
        description=textwrap.fill(
            "Pair masks in --pred and --ref by case id (file path below the folder, without suffix), "
            "score each pair per class and write metrics.csv and metrics.json. A prediction without a "
            "reference (or the reverse) is listed; an unreadable mask is a failure for that case. A "
            "prediction holding the reference's voxel centres in another axis order (e.g. LPS vs LAS) is "
            "transposed/flipped onto the reference grid exactly; a prediction on any other grid is a failure "
            "naming the offset, unless --resample nearest puts it on the reference grid. Distances are in mm "
            "of the reference grid (pixels where it has no physical pixel size). Exit status 1 if any case "
            "failed, else 0.",
            width=88,
        ),
        epilog=CONVENTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", type=Path, required=True, metavar="DIR", help="folder of predicted masks")
    parser.add_argument("--ref", type=Path, required=True, metavar="DIR", help="folder of reference masks")
    parser.add_argument(
        "--classes",
        type=_classes,
        metavar="NAME=VALUE,...",
        help="class names and mask values, e.g. membrane=0,cell=255 (default: predictions.json in --pred, "
        "else every value found, named label_<value>)",
    )
    parser.add_argument("--hd95", action="store_true", help="also the 95th-percentile Hausdorff distance (mm)")
    parser.add_argument(
        "--surface-dice-mm",
        type=float,
        metavar="MM",
        help="also the surface Dice with this boundary tolerance in mm, e.g. 1.0",
    )
    parser.add_argument(
        "--per-image",
        action="store_true",
        help="score numbered 2D images (img_01.png, img_02.png) each as a case, not as slices of one stack",
    )
    parser.add_argument(
        "--resample",
        choices=RESAMPLE_MODES,
        help="resample a prediction on another grid (shape, spacing, origin) onto its reference's grid by "
        "nearest neighbour, and say so in the report (default: refuse such a pair)",
    )
    parser.add_argument(
        "--isbi",
        action="store_true",
        help="also the ISBI 2012 EM challenge's pixel error (1 - best F-score of cell pixels: reference values "
        "above 0 and non-zero prediction values), per case and pooled over all cases",
    )
    parser.add_argument("--output", type=Path, metavar="DIR", help="where to write the reports (default: --pred)")
    parser.set_defaults(func=run)


def _classes(text: str) -> dict[str, int]:
    from medseg.evaluation.evaluate import parse_classes

    try:
        return parse_classes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _check_folders(args: argparse.Namespace) -> None:
    """Reports never land in the reference tree (an input), nor replace a file named as --output."""
    from medseg.pipeline import check_disjoint

    if Path(args.pred).resolve() == Path(args.ref).resolve():
        raise ConfigError(
            f"--pred {args.pred} and --ref {args.ref} are the same folder; "
            "point --pred at the predicted masks and --ref at the reference masks"
        )
    pred_folder = Path(args.pred).parent if Path(args.pred).is_file() else Path(args.pred)
    out = Path(args.output) if args.output is not None else pred_folder
    if out.is_file():
        raise ConfigError(f"--output {out} is an existing file; name a folder for metrics.csv and metrics.json")
    check_disjoint(args.ref, out)


def run(args: argparse.Namespace) -> int:
    from medseg.evaluation.evaluate import evaluate_folders
    from medseg.evaluation.reports import format_report, write_reports

    _check_folders(args)
    report = evaluate_folders(
        args.pred,
        args.ref,
        classes=args.classes,
        hd95=args.hd95,
        surface_mm=args.surface_dice_mm,
        stack_sequences=not args.per_image,
        resample=args.resample,
        isbi=args.isbi,
    )
    csv_path, json_path = write_reports(report, args.output)
    print(format_report(report))
    print(f"Reports: {csv_path} and {json_path}")
    if (args.pred / "predictions.json").is_file() and (args.output is None or Path(args.output) == Path(args.pred)):
        from medseg.review import write_review  # the page now shows the scores and reference outlines

        print(f"Review page: {write_review(args.pred, reference_dir=args.ref, progress=False)}")
    return 1 if report.failures else 0
