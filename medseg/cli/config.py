"""`medseg config CONFIG [--set KEY=VALUE ...]`: validate a config and show it resolved."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="validate a config file (with --set overrides) and print it with defaults filled in",
    )
    parser.add_argument("config", type=Path, help="YAML config file")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """The --set option every config-taking command shares."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set train.epochs=5 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import yaml

    from medseg.config import load_config

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.dump(), sort_keys=False).rstrip())
    return 0
