"""`medseg data fetch | list | phantom`: bring datasets here and check them, or generate one."""

from __future__ import annotations

import argparse
import os
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
    phantom.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of the names it writes (case_NNN...) already in the folder; other files are never touched",
    )

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
    _check_phantom_names(args.output, args.cases, args.overwrite)
    images, labels = write_ct_dataset(args.output, cases=args.cases, seed=args.seed)
    print(f"{args.cases} CT phantom volumes in {images}, labels in {labels} (liver=1, kidney=2, spine=3)")
    return 0


def _check_phantom_names(folder: Path, cases: int, overwrite: bool) -> None:
    """Before any volume is generated: every file the phantom writes lies inside ``folder`` (no link there leads
    out, --overwrite or not), and none exists unless --overwrite, as `medseg predict` keeps what it finds.

    Why: the names (case_000_0000.nii.gz) are common ones, and a user's volume of that name in the
    folder, or a file a link there points at, would be replaced without a word.
    """
    from medseg.data.phantoms import ct_dataset_paths
    from medseg.errors import MedsegError
    from medseg.files import ensure_inside

    targets = [path for pair in ct_dataset_paths(folder, cases) for path in pair]
    for path in targets:
        ensure_inside(folder, path)
    existing = [path for path in targets if os.path.lexists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the {len(targets)} files it writes)" if len(existing) > 1 else ""
        raise MedsegError(
            f"{existing[0]}: already exists{more}, so no phantom was written; pass --overwrite to replace the "
            f"phantom's own names (nothing else in {folder} is touched), or choose a fresh folder"
        )


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
