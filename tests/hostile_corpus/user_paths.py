"""Paths a user names or keeps, turned hostile: a mirror's entries that link out (class 10), a `--dest` that
lands in the mirror (class 1), a phantom folder that already holds a user's files (classes 1 and 2), and
`medseg view` pointed at something that is not a batch folder (class 3)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import CANARY, one_file_manifest
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import plant_user_files, sha256_of

CANARY_TEXT = CANARY.decode().strip()


def fetch_argv(w: World, mirror: Path, manifest: Path, dest: Path | None = None) -> list[str]:
    return ["data", "fetch", "tiny", "--mirror", str(mirror), "--dest", str(dest or w.out), "--manifest", str(manifest)]


# ============================================================================ 10. a mirror entry that leads out


def mirror_entry(kind: str):
    """`medseg data fetch` copying tiny/img/a.bin from a mirror where that entry is ``kind``.

    The manifest declares the bytes the entry leads to, so a copy that followed the link would verify.
    """

    def build(w: World) -> Run:
        mirror, outside = w.root / "mirror", w.root / "outside"
        (mirror / "tiny" / "img").mkdir(parents=True)
        (outside / "tiny" / "img").mkdir(parents=True)
        secret = outside / "secret.bin"
        secret.write_bytes(CANARY)
        (outside / "tiny" / "img" / "a.bin").write_bytes(CANARY)
        entry, data = mirror / "tiny" / "img" / "a.bin", CANARY
        if kind == "link-to-a-file-outside":
            entry.symlink_to(secret)
        elif kind == "link-to-etc-passwd":
            entry.symlink_to("/etc/passwd")
            data = Path("/etc/passwd").read_bytes()
        elif kind == "relative-link-out":
            entry.symlink_to(Path("..", "..", "..", "outside", "secret.bin"))
        elif kind == "link-chain-out":  # a link inside the mirror that itself links out
            (mirror / "hop.bin").symlink_to(secret)
            entry.symlink_to(mirror / "hop.bin")
        elif kind == "dataset-folder-linked-out":
            (mirror / "tiny" / "img").rmdir()
            (mirror / "tiny").rmdir()
            (mirror / "tiny").symlink_to(outside / "tiny")
        elif kind == "link-to-a-folder-outside":
            entry.symlink_to(outside)
        elif kind == "link-to-a-folder-inside":
            entry.symlink_to(mirror / "tiny")
        elif kind == "dangling-link-out":
            entry.symlink_to(outside / "gone.bin")
        elif kind == "dangling-link-inside":
            entry.symlink_to(mirror / "gone.bin")
        elif kind == "fifo":
            os.mkfifo(entry)
        elif kind == "link-inside-the-mirror":  # allowed: it resolves to a regular file inside the mirror
            (mirror / "store.bin").write_bytes(data)
            entry.symlink_to(Path("..", "..", "store.bin"))
        manifest = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(data), size=len(data))
        copied = w.out / "tiny" / "img" / "a.bin"
        if kind == "link-inside-the-mirror":
            return Run(fetch_argv(w, mirror, manifest), w.out, 0, says=("tiny: 1 files verified", "1 copied"))

        def nothing_copied() -> None:
            assert not copied.exists(), f"{copied} was copied from {entry}"

        says = ("a.bin", "not a regular file") if kind in NOT_REGULAR else ("a.bin", "outside the mirror")
        return Run(
            fetch_argv(w, mirror, manifest), w.out, 1, says=says, never_says=(CANARY_TEXT,), after=nothing_copied
        )

    return build


NOT_REGULAR = ("link-to-a-folder-inside", "dangling-link-inside", "fifo")
MIRROR_ENTRIES = [
    Case(f"mirror-entry-{kind}", 10, "data", mirror_entry(kind))
    for kind in (
        "link-to-a-file-outside",
        "link-to-etc-passwd",
        "relative-link-out",
        "link-chain-out",
        "dataset-folder-linked-out",
        "link-to-a-folder-outside",
        "dangling-link-out",
        *NOT_REGULAR,
        "link-inside-the-mirror",
    )
]


# ============================================================================ 1. a --dest that lands in the mirror


def dest_overlaps(layout: str):
    """`medseg data fetch` whose dataset folder would lie in, hold, or link into the mirror it reads.

    The mirror lacks tiny/img/a.bin and the manifest names a file:// copy inside it, so a fetch that
    went ahead would write the mirror (the walked sandbox shows it: nothing may change anywhere).
    """

    def build(w: World) -> Run:
        data = w.root / "data"
        mirror = data / "tiny" / "mirror" if layout == "dataset-folder-holds-the-mirror" else w.root / "mirror"
        (mirror / "tiny" / "img").mkdir(parents=True)
        (mirror / "copy.bin").write_bytes(b"data")
        url = (mirror / "copy.bin").as_uri()
        manifest = one_file_manifest(w.root / "m.csv", url, sha256=sha256_of(b"data"), size=4)
        dest = {"is-the-mirror": mirror, "inside-the-mirror": mirror / "datasets", "links-to-the-mirror": w.out}.get(
            layout, data
        )
        if layout == "links-to-the-mirror":
            w.out.symlink_to(mirror)
        if layout == "dataset-folder-links-into-the-mirror":
            data.mkdir()
            (data / "tiny").symlink_to(mirror / "tiny")
        return Run(fetch_argv(w, mirror, manifest, dest), None, 1, says=(str(dest), "overlaps the mirror", str(mirror)))

    return build


def dest_on_another_disk(w: World) -> Run:
    """Links in --dest are followed, as for `medseg predict --output`: a data root on another disk is a link."""
    mirror, disk = w.root / "mirror", w.root / "disk"
    (mirror / "tiny" / "img").mkdir(parents=True)
    (mirror / "tiny" / "img" / "a.bin").write_bytes(b"data")
    disk.mkdir()
    w.out.symlink_to(disk)
    manifest = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)

    def landed() -> None:
        assert (disk / "tiny" / "img" / "a.bin").read_bytes() == b"data"

    return Run(fetch_argv(w, mirror, manifest), disk, 0, says=("tiny: 1 files verified",), after=landed)


def dest_behind_a_link_loop(w: World) -> Run:
    mirror = w.root / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    (w.root / "loop").symlink_to(w.root / "loop")
    manifest = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)
    dest = w.root / "loop" / "data"
    return Run(fetch_argv(w, mirror, manifest, dest), None, 1, says=(str(dest), "cannot be resolved"))


DESTINATIONS = [
    *(
        Case(f"dest-{layout}", 1, "data", dest_overlaps(layout))
        for layout in (
            "is-the-mirror",
            "inside-the-mirror",
            "links-to-the-mirror",
            "dataset-folder-links-into-the-mirror",
            "dataset-folder-holds-the-mirror",
        )
    ),
    Case("dest-links-to-another-disk", 1, "data", dest_on_another_disk),
    Case("dest-behind-a-link-loop", 3, "data", dest_behind_a_link_loop),
]


# ================================================================== 1, 2. the phantom folder holds a user's files


def phantom_over(name: str, overwrite: bool = False):
    """`medseg data phantom` into a folder where ``name`` (one of the names it writes) is a user's file."""

    def build(w: World) -> Run:
        user = w.out / name
        user.parent.mkdir(parents=True)
        user.write_bytes(b"a user's own volume, not a phantom")
        plant_user_files(w.out / "imagesTr")
        argv = ["data", "phantom", str(w.out), "--cases", "1", *(["--overwrite"] if overwrite else [])]
        if overwrite:  # the phantom's own name is its to replace; the user's other files survive
            return Run(argv, w.out, 0, says=("1 CT phantom volumes",), may_change=(user,))
        return Run(argv, w.out, 1, says=(str(user), "already exists", "--overwrite"))

    return build


def phantom_beside_user_files(w: World) -> Run:
    planted = plant_user_files(w.out) + plant_user_files(w.out / "labelsTr")

    def written() -> None:
        assert sorted(p.name for p in (w.out / "imagesTr").iterdir()) == ["case_000_0000.nii.gz"]
        assert all(p.is_file() for p in planted)

    return Run(["data", "phantom", str(w.out), "--cases", "1"], w.out, 0, says=("1 CT phantom volumes",), after=written)


def phantom_second_run(w: World) -> Run:
    from medseg.data.phantoms import write_ct_dataset

    write_ct_dataset(w.out, cases=2)
    return Run(
        ["data", "phantom", str(w.out), "--cases", "2", "--seed", "1"],
        w.out,
        1,
        says=(str(w.out / "imagesTr" / "case_000_0000.nii.gz"), "already exists", "3 more"),
    )


def phantom_link_out(kind: str):
    """A folder or file the phantom writes is a link out of its folder: refused, --overwrite or not."""

    def build(w: World) -> Run:
        elsewhere = w.root / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "precious.nii.gz").write_bytes(b"a user's volume outside the phantom folder")
        link = w.out / ("imagesTr" if kind == "folder" else "labelsTr/case_000.nii.gz")
        link.parent.mkdir(parents=True)
        link.symlink_to(elsewhere if kind == "folder" else elsewhere / f"{kind}.nii.gz")
        argv = ["data", "phantom", str(w.out), "--cases", "1", "--overwrite"]
        return Run(argv, w.out, 1, says=(str(link), "outside the output folder"))

    return build


PHANTOM = [
    Case("phantom-keeps-a-users-image", 2, "data", phantom_over("imagesTr/case_000_0000.nii.gz")),
    Case("phantom-keeps-a-users-label", 2, "data", phantom_over("labelsTr/case_000.nii.gz")),
    Case("phantom-second-run-refused", 2, "data", phantom_second_run),
    Case("phantom-user-files-beside-survive", 2, "data", phantom_beside_user_files),
    Case("phantom-overwrite-replaces-only-its-own", 2, "data", phantom_over("imagesTr/case_000_0000.nii.gz", True)),
    *(
        Case(f"phantom-{what}-links-out", 1, "data", phantom_link_out(kind))
        for what, kind in (("folder", "folder"), ("file", "precious"), ("dangling-file", "gone"))
    ),
]


# ============================================================================ 3. view given something else


def view_path(kind: str):
    """`medseg view PATH` where PATH is not a batch output folder: one sentence naming it, the problem and the fix."""

    def build(w: World) -> Run:
        batch = w.root / "batch"
        batch.mkdir()
        (batch / "predictions.json").write_text('{"records": []}')
        (batch / "review.html").write_text("<html></html>")
        scan = w.inputs / "a.nii.gz"
        scan.write_bytes(b"a scan")
        path, says = {
            "a-scan-file": (scan, ("is a file, not a folder", "output folder of `medseg predict`")),
            "predictions-json": (batch / "predictions.json", ("is a file, not a folder", f"medseg view {batch}")),
            "review-html": (batch / "review.html", ("is a file, not a folder", f"medseg view {batch}")),
            "missing-folder": (w.root / "nope", ("does not exist", "medseg predict")),
            "dangling-link": (w.root / "link", ("a link to", "does not exist")),
            "below-a-file": (scan / "out", (f"{scan} is a file", "not a folder")),
            "fifo": (w.root / "pipe", ("is a FIFO, not a folder",)),
            "folder-without-predictions": (w.inputs, ("no predictions.json", "medseg predict")),
        }[kind]
        if kind == "dangling-link":
            path.symlink_to(w.root / "gone")
        if kind == "fifo":
            os.mkfifo(path)
        return Run(["view", str(path)], None, 1, says=(f"{path}: ", *says))

    return build


VIEW_PATHS = [
    Case(kind, 3, "view", view_path(kind))
    for kind in (
        "a-scan-file",
        "predictions-json",
        "review-html",
        "missing-folder",
        "dangling-link",
        "below-a-file",
        "fifo",
        "folder-without-predictions",
    )
]


USER_PATHS = [*MIRROR_ENTRIES, *DESTINATIONS, *PHANTOM, *VIEW_PATHS]
