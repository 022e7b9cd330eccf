"""`medseg demo`: the whole pipeline on generated data (or ISBI 2012), nothing downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate a phantom study, train small models, run the segment-study flow, write review pages",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("demo-output"), help="where to write (default: ./demo-output)"
    )
    parser.add_argument(
        "--data",
        choices=("phantom", "isbi2012"),
        default="phantom",
        help="phantom (generated, default) or isbi2012 (the real EM data, fetched or from MEDSEG_DATA_MIRROR)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter training (what the tests run)")
    parser.add_argument("--seed", type=int, default=0, help="phantom random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.demo import format_summary, run_demo

    result = run_demo(args.output, seed=args.seed, quick=args.quick, data=args.data)
    print(format_summary(result))
    return 0 if result.ok else 1
