"""`medseg serve [--config configs/nightly.yaml]`: serve the segment-study/nightly Prefect deployment."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
from pathlib import Path
from uuid import UUID

from medseg.cli.config import add_override_argument

DEFAULT_CONFIG = Path("configs/nightly.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the nightly segment-study deployment (Prefect): scheduled and hand-started runs",
        description=textwrap.fill(
            "Register the deployment segment-study/nightly (cron schedule and default parameters from the "
            "nightly config) with the Prefect server at PREFECT_API_URL and run its flow runs until stopped "
            "(Ctrl-C or SIGTERM cancels the runs in flight; the schedule stays on). One run at a time: "
            "others wait. A run whose process dies is marked Crashed once its heartbeats stop. Start a run "
            "by hand with: prefect deployment run segment-study/nightly [--param input_dir=DIR ...]. "
            "Several machines: prefect.yaml and prefect worker (README). Telemetry is off unless you set "
            "DO_NOT_TRACK=0.",
            width=88,
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"nightly config: schedule and default parameters (default: {DEFAULT_CONFIG})",
    )
    add_override_argument(parser)  # --set parameters.checkpoint=runs/unet_em (any key of the nightly config)
    parser.add_argument(
        "--init",
        action="store_true",
        help="write the shipped, commented nightly config to --config's path (default configs/nightly.yaml) "
        "to edit, then exit; an existing file is never replaced",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and print the deployment's parameters, then exit without serving",
    )
    parser.set_defaults(func=run)


def _init(path: Path) -> int:
    """Write the shipped nightly.yaml where ``--config`` points: the starting point an installed medseg has."""
    from medseg.config import packaged_config
    from medseg.errors import ConfigError
    from medseg.files import atomic_write_text

    if path.exists():
        raise ConfigError(f"{path} already exists; edit it, or move it away to write a fresh one with --init")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, packaged_config("nightly.yaml").read_text(encoding="utf-8"))
    print(
        f"Wrote {path}: set parameters.input_dir, output_dir and checkpoint (relative paths resolve against "
        f"{path.parent}), check it with `medseg serve --config {path} --check`, then serve it"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.init:
        return _init(args.config)
    if not args.config.is_file():
        from medseg.errors import ConfigError

        raise ConfigError(
            f"{args.config}: no nightly config there; `medseg serve --init` writes a commented one to edit "
            f"(to {DEFAULT_CONFIG}, or to --config PATH)"
        )
    # Imported here: `medseg_flows` sets Prefect's telemetry defaults before Prefect is first imported,
    # and other commands should not pay for importing Prefect.
    from medseg_flows.deployment import check_nightly, serve_nightly
    from medseg_flows.health import server_ui_url
    from medseg_flows.settings import load_nightly_config
    from medseg.cli import Terminated

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of the server otherwise
    config = load_nightly_config(args.config, args.overrides)
    if not config.parameters.input_dir.is_dir():
        print(
            f"medseg serve: warning: input_dir {config.parameters.input_dir} does not exist (yet); "
            "runs fail at start until it does",
            file=sys.stderr,
        )
    crash = config.crash_detection
    if args.check:
        parameters = check_nightly(config)
        print(f"segment-study/nightly: cron {config.schedule.cron!r} ({config.schedule.timezone})")
        for key, value in parameters.items():
            print(f"  {key}: {value}")
        print(
            f"crash detection: heartbeat every {crash.heartbeat_seconds} s, "
            f"Crashed after {crash.crashed_after_seconds} s without one"
        )
        return 0

    ui = server_ui_url()  # None when the server runs without its UI (prefect server start --no-ui)

    def ready(deployment_id: UUID) -> None:
        print(
            f"medseg serve: serving segment-study/nightly (cron {config.schedule.cron!r}, "
            f"{config.schedule.timezone}); one run at a time, others wait\n"
            f"  crash detection: a run without a heartbeat for {crash.crashed_after_seconds} s is marked Crashed\n"
            "  start a run by hand: prefect deployment run segment-study/nightly [--param input_dir=DIR ...]\n"
            "  stop: Ctrl-C or SIGTERM (runs in flight are cancelled; the schedule stays on)",
            flush=True,
        )
        if ui:
            print(f"  UI: {ui}/deployments/deployment/{deployment_id}", flush=True)

    stopped_by = serve_nightly(config, ready)
    if stopped_by == signal.SIGTERM:
        raise Terminated()  # medseg.cli prints "medseg serve: stopped (SIGTERM)" and exits 143
    if stopped_by is not None:
        raise KeyboardInterrupt  # ... "stopped", exit 130
    return 0
