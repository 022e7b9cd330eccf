"""Paths a user names or keeps, turned hostile: a mirror's entries that link out (class 10), a `--dest` that
lands in the mirror (class 1), a phantom folder that already holds a user's files (classes 1 and 2), and
`medseg view` pointed at something that is not a batch folder (class 3)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import CANARY, one_file_manifest
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import sha256_of

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


USER_PATHS = [*MIRROR_ENTRIES]
