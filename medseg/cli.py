"""The `medseg` command: one sub-command per module in medseg.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from medseg import __version__
from medseg.errors import MedsegError

# Each module exposes register(subparsers); its parser sets `func` to the handler.
COMMAND_MODULES = (
    "medseg.commands.info",
    "medseg.commands.data",
    "medseg.commands.config",
    "medseg.commands.train",
    "medseg.commands.predict",
    "medseg.commands.evaluate",
    "medseg.commands.demo",
    "medseg.commands.serve",
    "medseg.commands.view",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Batch segmentation of medical and microscopy images.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Library INFO lines say nothing a user acts on (highdicom alone logs ~10 per DICOM SEG); -v shows them.
    for name in ("highdicom", "httpx", "distributed"):
        logging.getLogger(name).setLevel(logging.NOTSET if args.verbose else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
