"""The paths a user names to `medseg data fetch` (the mirror's entries, --dest), `medseg data phantom` and
`medseg view`, where they lead elsewhere or hold something else (issue #15; the hostile corpus runs the
same situations end to end through the CLI, tests/hostile_corpus/user_paths.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import nibabel as nib
import pytest

from conftest import one_file_manifest
from medseg.cli import main
from medseg.data.mirror import open_regular
from medseg.data.download import fetch
from medseg.errors import ManifestError

DATA = b"the dataset's bytes"
SHA = hashlib.sha256(DATA).hexdigest()


def _mirror(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A mirror with tiny/img/ (empty), a file outside it holding the declared bytes, and the manifest."""
    mirror, outside = tmp_path / "mirror", tmp_path / "outside"
    (mirror / "tiny" / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "a.bin").write_bytes(DATA)
    return mirror, outside, one_file_manifest(tmp_path / "m.csv", "", sha256=SHA, size=len(DATA))


def test_fetch_copies_only_the_mirrors_own_regular_files(tmp_path: Path) -> None:
    mirror, outside, manifest = _mirror(tmp_path)
    entry, dest = mirror / "tiny" / "img" / "a.bin", tmp_path / "dest"
    entry.symlink_to(outside / "a.bin")  # the declared bytes, but from outside the mirror
    with pytest.raises(ManifestError) as err:
        fetch("tiny", dest, mirror=mirror, manifest=manifest)
    message = str(err.value)
    assert message.startswith(str(entry)) and "outside the mirror" in message and str(outside / "a.bin") in message
    assert "replace the link with the file itself" in message and "\n" not in message
    assert not (dest / "tiny" / "img" / "a.bin").exists()

    entry.unlink()
    (mirror / "store.bin").write_bytes(DATA)
    entry.symlink_to(mirror / "store.bin")  # a link that stays inside the mirror is the mirror's own file
    report = fetch("tiny", dest, mirror=mirror, manifest=manifest)
    assert report.copied == ["img/a.bin"] and (dest / "tiny" / "img" / "a.bin").read_bytes() == DATA
    assert not (dest / "tiny" / "img" / "a.bin").is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling"])
def test_a_mirror_entry_that_is_no_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    mirror, _, manifest = _mirror(tmp_path)
    entry = mirror / "tiny" / "img" / "a.bin"
    if kind == "fifo":
        os.mkfifo(entry)  # opening it would wait for a writer
    elif kind == "folder":
        entry.mkdir()
    else:
        entry.symlink_to(mirror / "gone.bin")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetch("tiny", tmp_path / "dest", mirror=mirror, manifest=manifest)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "fetch blocked on the mirror entry"
    assert outcome and isinstance(outcome[0], ManifestError), outcome
    assert str(outcome[0]).startswith(str(entry)) and "not a regular file" in str(outcome[0])


def test_the_copy_opens_only_a_regular_file_whatever_was_swapped_in(tmp_path: Path) -> None:
    """Between the check and the open a link or a FIFO may replace the file: the open itself refuses it."""
    regular = tmp_path / "a.bin"
    regular.write_bytes(DATA)
    with open_regular(regular) as handle:
        assert handle.read() == DATA
    (tmp_path / "link").symlink_to(regular)
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "link", tmp_path / "fifo"):
        with pytest.raises(OSError):
            open_regular(path)


@pytest.mark.parametrize("layout", ["equal", "inside", "link", "dataset-link", "holding"])
def test_fetch_never_writes_into_the_mirror_whatever_dest_is(tmp_path: Path, layout: str) -> None:
    mirror = tmp_path / "data" / "tiny" / "m" if layout == "holding" else tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "copy.bin").write_bytes(DATA)  # a file:// source inside the mirror: a fetch would write its copy
    manifest = one_file_manifest(tmp_path / "m.csv", (mirror / "copy.bin").as_uri(), SHA, len(DATA))
    dest = {"equal": mirror, "inside": mirror / "datasets", "link": tmp_path / "link"}.get(layout, tmp_path / "data")
    if layout == "link":
        dest.symlink_to(mirror)
    if layout == "dataset-link":
        dest.mkdir()
        (dest / "tiny").symlink_to(mirror / "tiny")
    before = sorted(mirror.rglob("*"))
    with pytest.raises(ManifestError) as err:
        fetch("tiny", dest, mirror=mirror, manifest=manifest)
    message = str(err.value)
    assert message.startswith(f"{dest}: ") and f"overlaps the mirror {mirror}" in message and "--dest" in message
    assert sorted(mirror.rglob("*")) == before


def test_fetch_follows_a_dest_link_that_leads_elsewhere_and_names_a_loop(tmp_path: Path) -> None:
    mirror, _, manifest = _mirror(tmp_path)
    (mirror / "tiny" / "img" / "a.bin").write_bytes(DATA)
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "data").symlink_to(disk)  # a data root on another disk
    assert fetch("tiny", tmp_path / "data", mirror=mirror, manifest=manifest).copied == ["img/a.bin"]
    assert (disk / "tiny" / "img" / "a.bin").read_bytes() == DATA
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ManifestError, match="cannot be resolved.*remove the link loop"):
        fetch("tiny", tmp_path / "loop" / "data", mirror=mirror, manifest=manifest)


def test_phantom_keeps_a_users_file_of_its_names_unless_told_to_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "phantom"
    user = out / "labelsTr" / "case_000.nii.gz"
    user.parent.mkdir(parents=True)
    user.write_bytes(b"a user's label")
    (out / "labelsTr" / "notes.txt").write_text("a user's notes")
    assert main(["data", "phantom", str(out), "--cases", "1"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{user}: already exists" in error and "--overwrite" in error
    assert user.read_bytes() == b"a user's label" and not (out / "imagesTr").exists()  # nothing written

    assert main(["data", "phantom", str(out), "--cases", "1", "--overwrite"]) == 0
    assert nib.load(user).shape == nib.load(out / "imagesTr" / "case_000_0000.nii.gz").shape  # the phantom's label
    assert (out / "labelsTr" / "notes.txt").read_text() == "a user's notes"


def test_phantom_writes_nothing_through_a_link_out_of_its_folder(tmp_path: Path, capsys) -> None:
    out, elsewhere = tmp_path / "phantom", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.nii.gz").write_bytes(b"outside")
    (out / "labelsTr").mkdir(parents=True)
    (out / "labelsTr" / "case_000.nii.gz").symlink_to(elsewhere / "precious.nii.gz")
    assert main(["data", "phantom", str(out), "--cases", "1", "--overwrite"]) == 1
    assert "outside the output folder" in capsys.readouterr().err
    assert (elsewhere / "precious.nii.gz").read_bytes() == b"outside" and not (out / "imagesTr").exists()


@pytest.mark.parametrize(
    "kind, problem, fix",
    [
        ("scan", "is a file, not a folder", "not a scan or a mask"),
        ("predictions", "is a file, not a folder", "medseg view {batch}"),
        ("missing", "does not exist", "run `medseg predict"),
        ("dangling", "is a link to {root}/gone, which does not exist", "point it at a batch folder"),
        ("below-a-file", "does not exist ({root}/a.nii.gz is a file, not a folder)", "the output folder of"),
        ("fifo", "is a FIFO, not a folder", "the output folder of"),
    ],
)
def test_view_names_the_path_the_problem_and_the_fix(tmp_path: Path, capsys, kind: str, problem: str, fix: str) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "predictions.json").write_text('{"records": []}')
    (tmp_path / "a.nii.gz").write_bytes(b"a scan")
    path = {
        "scan": tmp_path / "a.nii.gz",
        "predictions": batch / "predictions.json",
        "missing": tmp_path / "nope",
        "dangling": tmp_path / "link",
        "below-a-file": tmp_path / "a.nii.gz" / "out",
        "fifo": tmp_path / "pipe",
    }[kind]
    if kind == "dangling":
        path.symlink_to(tmp_path / "gone")
    if kind == "fifo":
        os.mkfifo(path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["view", str(path)]) == 1  # as every command that refuses a path it was given
    console = capsys.readouterr()
    assert console.out == "" and console.err.count("\n") == 1 and "Traceback" not in console.err
    message = console.err.removeprefix("medseg view: error: ")
    assert message.startswith(f"{path}: {problem.format(root=tmp_path)}"), message
    assert fix.format(batch=batch) in message
    assert sorted(tmp_path.rglob("*")) == before
