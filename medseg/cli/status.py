"""`medseg status`: will tonight's segment-study/nightly run happen? A health check for operators and monitoring."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="health of the nightly deployment: schedule, paused, next and last run; exit 1 if it will not run",
        description=textwrap.fill(
            "Ask the Prefect server at PREFECT_API_URL about segment-study/nightly and print its schedule, "
            "whether it is paused, whether a `medseg serve` or a worker is polling for its runs, the next "
            "scheduled run, runs in flight and the last run that ended (state and counts). Exits 1, with one "
            "sentence for each reason, when the next nightly run will not happen: no server, no deployment, "
            "paused, no active schedule, or nothing polling for its runs; 0 otherwise.",
            width=88,
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: `medseg_flows` sets Prefect's telemetry defaults before Prefect is first imported,
    # and other commands should not pay for importing Prefect. medseg_flows.health imports no torch.
    from medseg_flows.health import ServerUnavailable, nightly_health, require_server
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    logging.getLogger("httpx").setLevel(logging.WARNING)
    api_url = get_current_settings().api.url
    try:
        require_server(api_url)
    except ServerUnavailable as exc:
        print(f"medseg status: {exc}", file=sys.stderr)
        print("medseg status: the next nightly run will not happen until this is fixed", file=sys.stderr)
        return 1
    with get_client(sync_client=True) as client:
        health = nightly_health(client, api_url)
    print("\n".join(health.lines()))
    for problem in health.problems:
        print(f"medseg status: {problem}", file=sys.stderr)
    if health.problems:
        print("medseg status: the next nightly run will not happen until this is fixed", file=sys.stderr)
        return 1
    print("OK: the next nightly run will start when it is due")
    return 0
