"""`medseg demo`: run the pipeline on a generated sample study (no downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.demo import format_summary, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate a sample study (DICOM, NIfTI, TIFF, PNG) and run medseg on it",
    )
    parser.add_argument("--output", type=Path, default=Path("demo-output"), help="where to write (default: ./demo-output)")
    parser.add_argument("--seed", type=int, default=0, help="phantom random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.output, seed=args.seed)
    print(format_summary(summary))
    print(f"\nDetails: {args.output / 'summary.json'}  (inspect any scan with: medseg info {summary['study']}/images)")
    failed = summary["problems"] or any(c["problems"] for c in summary["cases"])
    return 1 if failed else 0
