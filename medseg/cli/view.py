"""`medseg view OUTPUT_DIR`: write the review page of a batch if needed and serve it on this machine."""

from __future__ import annotations

import argparse
import textwrap
import webbrowser
from pathlib import Path

from medseg.constants import DEFAULT_HOST


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "view",
        help="serve a batch output folder's review page (review.html) on this machine",
        description=textwrap.fill(
            "Write review.html (and review/, its per-case data) into OUTPUT_DIR where it is missing or older "
            "than predictions.json / metrics.json, then serve OUTPUT_DIR read-only over HTTP on 127.0.0.1 "
            "until Ctrl+C and print the page's address. Only files below OUTPUT_DIR are served. "
            "review.html also works opened straight from disk.",
            width=88,
        ),
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="output folder of `medseg predict`")
    parser.add_argument("--port", type=_port, default=0, help="port to listen on (default: a free one)")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; "
        "0.0.0.0 shows the page, and the masks, to your whole network)",
    )
    parser.add_argument("--open", action="store_true", help="open the page in a web browser")
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="DIR",
        help="reference masks to outline (default: the reference folder of metrics.json)",
    )
    parser.add_argument(
        "--learning-curves",
        type=Path,
        metavar="PNG",
        help="learning_curves.png of the training run (default: found beside the checkpoint)",
    )
    parser.add_argument("--rebuild", action="store_true", help="write the review page again even if up to date")
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give 1-65535, or 0 for a free one")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from medseg.review import LOOPBACK, PAGE_NAME, ReviewServer, review_is_stale, write_review

    output: Path = args.output
    if args.rebuild or args.reference or args.learning_curves or review_is_stale(output):
        page = write_review(output, args.reference, args.learning_curves)
        print(f"Wrote {page}", flush=True)
    server = None
    try:  # from the moment the port listens: Ctrl+C stops it the same way whenever it comes
        server = ReviewServer(output, args.host, args.port).start()
        url = server.url + PAGE_NAME
        print(f"Review page: {url}", flush=True)
        print(f"Serving {server.root} (only files below it); press Ctrl+C to stop.", flush=True)
        if args.host not in LOOPBACK:
            print(f"Note: listening on {args.host}, so other machines can reach these scans and masks.", flush=True)
        if args.open and not webbrowser.open(url):
            print("No web browser found here; open the address above yourself.", flush=True)
        server.wait()
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0
