"""`medseg data fetch | list | phantom`: bring datasets here and check them, or generate one."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.data import download, manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its `fetch` and `list` actions."""
    parser = subparsers.add_parser(
        "data",
        help="fetch and verify datasets named in data_manifest.csv",
        description="Fetch datasets named in data_manifest.csv and verify their sha256 sums. "
        f"Data root: --dest, else $MEDSEG_DATA_DIR, else {manifest.default_data_root()}.",
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION", required=True)

    fetch = actions.add_parser(
        "fetch",
        help="copy (from a mirror) or download a dataset and verify every file",
        description="Files already present and verified are kept; a file whose checksum differs "
        "is an error unless --force. Downloads go over https:// only; a file:// source_url is read "
        "only from inside the mirror. A file is cut off (and its partial download deleted) as soon as "
        f"it grows past the manifest's size column, or {download.MAX_UNDECLARED_BYTES // 2**30} GiB where "
        "the manifest gives no size.",
    )
    fetch.add_argument("dataset", help="dataset id from the manifest, e.g. isbi2012_em")
    fetch.add_argument(
        "--mirror",
        type=Path,
        help="local folder laid out as DIR/<dataset>/<path> to copy from, and the only place file:// "
        "source URLs may point into (default: $MEDSEG_DATA_MIRROR; files not in it are downloaded)",
    )
    fetch.add_argument("--force", action="store_true", help="replace local files whose checksum differs")
    _add_common(fetch)

    listing = actions.add_parser("list", help="show each dataset and whether it is present and verified")
    _add_common(listing)

    phantom = actions.add_parser(
        "phantom",
        help="write a labelled CT phantom dataset (nnU-Net layout: imagesTr/, labelsTr/)",
        description="Generated, deterministic data for trying the 3D path with no download.",
    )
    phantom.add_argument("output", type=Path, help="folder to write imagesTr/ and labelsTr/ into")
    phantom.add_argument("--cases", type=int, default=6, help="number of volumes (default 6)")
    phantom.add_argument("--seed", type=int, default=0)

    parser.set_defaults(func=handler)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", type=Path, help="data root; datasets go to DEST/<dataset>/")
    parser.add_argument("--manifest", type=Path, help="manifest CSV (default: the repository's data_manifest.csv)")


def handler(args: argparse.Namespace) -> int:
    """Run the chosen action; errors surface as ManifestError for the CLI to print."""
    if args.action == "fetch":
        return _fetch(args)
    if args.action == "phantom":
        return _phantom(args)
    return _list(args)


def _phantom(args: argparse.Namespace) -> int:
    from medseg.data.phantoms import write_ct_dataset
    from medseg.pipeline.output import probe_output

    probe_output(args.output, "the phantom folder")
    images, labels = write_ct_dataset(args.output, cases=args.cases, seed=args.seed)
    print(f"{args.cases} CT phantom volumes in {images}, labels in {labels} (liver=1, kidney=2, spine=3)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    report = download.fetch(args.dataset, dest=args.dest, mirror=args.mirror, force=args.force, manifest=args.manifest)
    print(report.summary())
    return 0


def _list(args: argparse.Namespace) -> int:
    statuses = manifest.dataset_status(dest=args.dest, manifest=args.manifest)
    header = ("dataset", "files", "present", "verified", "status", "where")
    rows = [(s.dataset, str(s.expected), str(s.present), str(s.verified), s.status, str(s.folder)) for s in statuses]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    dest = f" --dest {args.dest}" if args.dest else ""
    for s in statuses:
        if s.corrupt:
            print(
                f"{s.dataset}: {len(s.corrupt)} corrupt (first: {s.corrupt[0]}); "
                f"run `medseg data fetch {s.dataset}{dest} --force`"
            )
        elif s.status != "verified":
            print(f"{s.dataset}: {len(s.missing)} missing; run `medseg data fetch {s.dataset}{dest} --mirror DIR`")
    return 0
