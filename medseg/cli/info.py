"""`medseg info PATH`: list the scans medseg finds, with geometry and problems."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list the scans in a file or folder with shape, spacing, affine and problems",
        description="Discover and load every scan under PATH and show what medseg sees.",
    )
    parser.add_argument("path", type=Path, help="a scan file, a DICOM series folder, or a folder tree")
    parser.add_argument("--json", action="store_true", help="print JSON (keys documented in README.md)")
    parser.add_argument(
        "--color", choices=("grey", "channels"), default="grey", help="RGB images as grey or as channels"
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="MB",
        help="refuse (from its header, before decoding) a scan that would take more than MB megabytes in memory; "
        "default: a quarter of the available memory, at most 4096 MB",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.ingest.survey import format_report, inspect_path
    from medseg.ingest import LoadOptions

    report = inspect_path(args.path, LoadOptions(color=args.color, memory_budget_mb=args.memory_budget))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    failed = report["problems"] or any(s["problems"] for s in report["scans"])
    return 1 if failed else 0
