"""The per-scan pipeline at the trust boundary: containment, only our own litter, output checked first,
one scan's failure is that scan's, umask, checkpoints that do not fit (issue #15 items 1-4, 8, 11)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import medseg.errors
import medseg.files
import medseg.pipeline.output
import medseg.pipeline.scan
from medseg.data import phantoms
from medseg.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from medseg.cli import main
from medseg.files import JOURNAL_DIR, TMP_MARKER, contained_path, remove_own_temporaries, safe_part
from medseg.inference.predictor import Predictor
from medseg.ingest import discover
from medseg.pipeline import segment_folder
from medseg.training.loop import train

from conftest import (
    checkpoint_v1_payload,
    em_nifti_scans,
    series_with_numbers,
    snapshot,
    tiny_em_config,
    write_em_pairs,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    write_em_pairs(root, slices=5)
    return train(tiny_em_config(root, root / "runs", "tiny", epochs=1, steps_per_epoch=2), progress=False).run_dir


def _files_outside(root: Path, allowed: Path, before: set[Path]) -> list[Path]:
    """Files under ``root`` that are new since ``before`` and not inside ``allowed``."""
    now = {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(p for p in now - before if allowed not in p.parents)


@pytest.mark.parametrize(
    "numbers",
    [
        ["1/../../..", "2"],
        ["../../../../tmp/evil", "..\\..\\x"],
        ["1/x", "1_x"],  # different tags, the same name once sanitised: distinct ids
        [".", ".."],
    ],
)
def test_dicom_metadata_never_becomes_a_path_outside_the_output(model, tmp_path, numbers):
    series_with_numbers(tmp_path / "in" / "study", numbers)
    before_inputs = snapshot(tmp_path / "in")
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    report = segment_folder(Predictor(model), tmp_path / "in", out, formats=["nifti"], progress=False)
    assert report.counts()["written"] == len(numbers), report.records
    assert not _files_outside(tmp_path, out, before)
    assert snapshot(tmp_path / "in") == before_inputs
    written = [Path(o) for r in report.records for o in r.outputs]
    assert len(set(written)) == len(numbers)  # no case overwrote another
    assert all(out.resolve() in p.resolve().parents for p in written)


@pytest.mark.parametrize("name", ["..", ".", "a/../../b", "\x00x", "x\x1fy", "/etc/passwd", "\udcff\udcfe", "é" * 200])
def test_safe_part_and_contained_path_keep_every_name_inside(tmp_path, name):
    part = safe_part(name)
    assert part not in ("", ".", "..") and "/" not in part and "\x00" not in part and not part.startswith(".")
    assert len(part.encode()) <= 200
    path = contained_path(tmp_path, name, ".nii.gz")
    assert tmp_path.resolve() in path.resolve().parents
    assert path.name.endswith(".nii.gz") and len(path.name.encode()) <= 255  # a long name is cut before its suffix


def test_a_link_in_the_output_that_points_away_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "case").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(medseg.files.OutsideRootError, match="outside the output folder"):
        contained_path(tmp_path / "out", "case/scan", ".nii.gz")


@pytest.mark.parametrize("layout", ["equal", "inside", "holding", "linked-in", "linked-holding"])
def test_overlapping_input_and_output_are_refused_before_anything_is_written(model, tmp_path, capsys, layout):
    inputs = tmp_path / "data" / "in"
    em_nifti_scans(inputs, ["a"])
    output = {
        "equal": inputs,
        "inside": inputs / "masks",
        "holding": tmp_path / "data",
        "linked-in": tmp_path / "link",
        "linked-holding": tmp_path / "link2",
    }[layout]
    if layout == "linked-in":
        output.symlink_to(inputs)
    if layout == "linked-holding":
        output.symlink_to(tmp_path / "data")
    before = snapshot(tmp_path / "data")
    code = main(["predict", "--checkpoint", str(model), "--input", str(inputs), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 1 and "overlap" in err and str(inputs) in err and "Traceback" not in err
    assert err.count("\n") == 1  # one sentence
    assert snapshot(tmp_path / "data") == before
    assert not (inputs / "masks").exists()


def test_output_that_is_a_file_is_refused_naming_it(model, tmp_path, capsys):
    em_nifti_scans(tmp_path / "in", ["a"])
    (tmp_path / "out.txt").write_text("not a folder")
    code = main(
        ["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out.txt")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "out.txt is an existing file" in err and "Traceback" not in err
    assert (tmp_path / "out.txt").read_text() == "not a folder"


def test_output_without_room_is_refused_before_the_batch(model, tmp_path, monkeypatch, capsys):
    em_nifti_scans(tmp_path / "in", ["a", "b"])
    monkeypatch.setattr(
        medseg.pipeline.output.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9, 1000)
    )
    code = main(
        ["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "0 MB free" in err and "may need up to" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_user_files_survive_and_only_journalled_litter_of_dead_runs_goes(model, tmp_path):
    em_nifti_scans(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    users = {
        out / ".thesis.partial.docx": b"thesis",
        out / ".a.nii.gz.x.part.nii.gz": b"looks like litter",
        out / f"notes{TMP_MARKER}.txt": b"a user's file with our marker, in no journal",
    }
    for path, data in users.items():
        path.write_bytes(data)
    proc = subprocess.Popen(["true"])
    proc.wait()
    ours = out / f".a.deadbeef{TMP_MARKER}.nii.gz"
    ours.write_bytes(b"half")
    live = out / f".b.cafe{TMP_MARKER}.nii.gz"
    live.write_bytes(b"being written by a live process")
    journal = out / JOURNAL_DIR
    journal.mkdir(parents=True)
    host = socket.gethostname()
    entries = {
        "deadbeef": {"tmp": ours.name, "pid": proc.pid, "host": host},
        "cafe": {"tmp": live.name, "pid": os.getpid(), "host": host},
        "escape": {"tmp": "../victim.txt", "pid": proc.pid, "host": host},
        "user": {"tmp": ".thesis.partial.docx", "pid": proc.pid, "host": host},
        "forged": {"tmp": f"notes{TMP_MARKER}.txt", "pid": proc.pid, "host": host},  # our marker, not its token
    }
    for name, entry in entries.items():
        (journal / f"{name}.json").write_text(json.dumps(entry))
    (journal / "garbage.json").write_text("{not json")
    report = segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
    assert report.counts()["written"] == 1
    assert not ours.exists() and live.exists() and victim.read_text() == "outside"
    assert all(path.read_bytes() == data for path, data in users.items())
    assert sorted(p.name for p in journal.iterdir()) == ["cafe.json", "garbage.json"]  # torn entries age out
    assert remove_own_temporaries(out) == []


def test_an_unexpected_error_fails_its_scan_logs_a_traceback_and_the_batch_goes_on(model, tmp_path, monkeypatch):
    em_nifti_scans(tmp_path / "in", ["a", "b", "c"])
    real = Predictor.predict

    def predict(self, scan, probabilities=False):
        if scan.ref.id == "b":
            raise KeyError("something nobody planned for")
        return real(self, scan, probabilities)

    monkeypatch.setattr(Predictor, "predict", predict)
    out = tmp_path / "out"
    report = segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
    status = {r.case: (r.status, r.reason) for r in report.records}
    assert status["a"][0] == status["c"][0] == "written"
    assert status["b"][0] == "failed" and status["b"][1].startswith("unexpected KeyError")
    log = out / "logs" / "b.traceback.txt"
    assert str(log) in status["b"][1] and "something nobody planned for" in log.read_text()
    assert "Traceback" in log.read_text()
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["counts"] == {"written": 2, "skipped": 0, "failed": 1}
    assert (out / "review.html").is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_or_read_only_output_stops_the_batch_cleanly(model, tmp_path, monkeypatch, capsys, code):
    em_nifti_scans(tmp_path / "in", ["a", "b", "c"])
    out = tmp_path / "out"
    real_save, calls = nib.save, []

    def save(img, filename):
        calls.append(filename)
        if len(calls) == 2:  # the second mask: the disk is full now
            raise OSError(code, os.strerror(code), str(filename))
        return real_save(img, filename)

    monkeypatch.setattr(nib, "save", save)
    before = snapshot(tmp_path / "in")
    result = main(["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(out)])
    captured = capsys.readouterr()
    assert result == 1 and "stopped early" in captured.err and os.strerror(code) in captured.err
    assert "rerun the same command to resume" in captured.err and "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz"]
    assert not list(out.rglob(f"*{TMP_MARKER}*")) and not list((out / JOURNAL_DIR).glob("*"))
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["stopped"] and manifest["counts"]["written"] == 1
    assert snapshot(tmp_path / "in") == before
    monkeypatch.setattr(nib, "save", real_save)
    assert main(["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert "2 written, 1 skipped" in capsys.readouterr().out  # resumed


def test_transient_input_errors_are_retried_and_permanent_ones_fail_the_scan(model, tmp_path, monkeypatch):
    em_nifti_scans(tmp_path / "in", ["flaky", "gone"])
    real, attempts = medseg.pipeline.scan.load, []

    def load(ref, options):
        attempts.append(ref.id)
        if ref.id == "flaky" and attempts.count("flaky") == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        if ref.id == "gone":
            raise OSError(errno.ENOENT, "No such file or directory", str(ref.path))
        return real(ref, options)

    monkeypatch.setattr(medseg.pipeline.scan, "load", load)
    monkeypatch.setattr(medseg.pipeline.scan, "RETRY_DELAYS", (0.0, 0.0))
    report = segment_folder(Predictor(model), tmp_path / "in", tmp_path / "out", progress=False)
    status = {r.case: r for r in report.records}
    assert status["flaky"].status == "written" and attempts.count("flaky") == 2
    assert status["gone"].status == "failed" and "No such file" in status["gone"].reason and attempts.count("gone") == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_masks_and_reports_honour_the_umask(model, tmp_path, umask, mode):
    em_nifti_scans(tmp_path / "in", ["a"])
    old = os.umask(umask)
    try:
        segment_folder(Predictor(model), tmp_path / "in", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    for name in ("a.nii.gz", "predictions.json", "review.html"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == mode, name


def test_checkpoint_weights_that_do_not_fit_their_config_are_one_sentence(model, tmp_path):
    state = load_checkpoint(model)
    wider = state.config.model_copy(deep=True)
    wider.model.features = 16
    save_checkpoint(Checkpoint(wider, state.weights), tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match=r"weights do not fit the stored model config.*another shape.*stored"):
        Predictor(tmp_path / "wider.pt")
    trimmed = dict(state.weights)
    trimmed.pop(next(iter(trimmed)))
    save_checkpoint(Checkpoint(state.config, trimmed), tmp_path / "trimmed.pt")
    with pytest.raises(CheckpointError, match="missing"):
        Predictor(tmp_path / "trimmed.pt")


def test_schema_1_checkpoints_still_load_and_are_checked_against_their_config(model, tmp_path):
    state = load_checkpoint(model)
    torch.save(checkpoint_v1_payload(state), tmp_path / "old.pt")
    old = Predictor(tmp_path / "old.pt")
    assert old.classes == state.classes and old.config.model == state.config.model
    torch.save(checkpoint_v1_payload(state, classes={"membrane": 0}), tmp_path / "fewer.pt")
    with pytest.raises(CheckpointError, match="differ from its config's data.classes"):
        load_checkpoint(tmp_path / "fewer.pt")
    bad = state.config.dump()
    bad["data"]["classes"] = {"membrane": 0}  # fewer class names than outputs
    torch.save({**checkpoint_v1_payload(state), "config": bad, "classes": {"membrane": 0}}, tmp_path / "one_class.pt")
    with pytest.raises(CheckpointError, match="stored config is not valid"):
        load_checkpoint(tmp_path / "one_class.pt")
    torch.save(
        {"format": "medseg-checkpoint/2", "config": state.config.dump(), "model": {"w": "not a tensor"}},
        tmp_path / "strings.pt",
    )
    with pytest.raises(CheckpointError, match="without a config or weights"):
        load_checkpoint(tmp_path / "strings.pt")


def test_a_scan_with_other_channels_than_the_model_fails_alone(model, tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in" / "colour.png")
    em_nifti_scans(tmp_path / "in", ["grey"])
    ckpt = load_checkpoint(model)
    ckpt.config.data.color = "channels"  # the scans load with 3 channels; the model takes 1
    save_checkpoint(ckpt, tmp_path / "m.pt")
    report = segment_folder(Predictor(tmp_path / "m.pt"), tmp_path / "in", tmp_path / "out", progress=False)
    status = {r.case: r for r in report.records}
    assert status["colour"].status == "failed" and "3 channel(s) but the model takes 1" in status["colour"].reason
    assert status["grey"].status == "written"


def test_cli_run_as_a_subprocess_prints_no_traceback_for_a_hostile_batch(model, tmp_path):
    series_with_numbers(tmp_path / "in", ["1/../../..", "2"])
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg",
            "predict",
            "--checkpoint",
            str(model),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--format",
            "nifti",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert "2 written, 0 skipped (up to date), 1 failed" in done.stdout
    assert all((tmp_path / "out").resolve() in p.resolve().parents for p in (tmp_path / "out").rglob("*.nii.gz"))
    assert len(discover(tmp_path / "out").scans) == 2


def test_a_scan_that_would_resample_past_the_budget_fails_alone_before_resampling(tmp_path, capsys):
    """Voxels of 40 mm for a model at 0.5 mm: 80^3 times the voxels; refused from the header, the others go on."""
    from medseg.config import config_from_dict
    from medseg.models import build_model

    config = config_from_dict(
        {
            "data": {"classes": {"background": 0, "organ": 1}},
            "preprocess": {"orientation": "RAS", "spacing": [0.5, 0.5, 0.5]},
            "model": {"name": "unet", "spatial_dims": 3, "features": 4, "depth": 2},
            "train": {"patch_size": [16, 16, 16]},
        }
    )
    save_checkpoint(Checkpoint(config, build_model(config.model).state_dict()), tmp_path / "m.pt")
    volume = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    phantoms.write_nifti(volume, np.diag([40.0, 40.0, 40.0, 1.0]), tmp_path / "in" / "coarse.nii.gz")
    phantoms.write_nifti(volume, np.diag([0.5, 0.5, 0.5, 1.0]), tmp_path / "in" / "fine.nii.gz")
    args = [
        "predict",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--memory-budget",
        "256",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED coarse:" in out and "256" in out and "--memory-budget" in out
    assert "1 written, 0 skipped (up to date), 1 failed" in out


def test_a_bind_mounted_output_is_the_input_and_is_refused(model, tmp_path, capsys):
    """A bind mount has another path but the same folder: compared by device and inode, refused."""
    em_nifti_scans(tmp_path / "in", ["a"])
    (tmp_path / "out").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"bind mounts need root and mount(8): {mounted.stderr.decode().strip()}")
    try:
        before = snapshot(tmp_path / "in")
        code = main(
            ["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
        )
        err = capsys.readouterr().err
        assert code == 1 and "through a bind mount" in err and "Traceback" not in err
        assert snapshot(tmp_path / "in") == before
    finally:
        subprocess.run(["umount", str(tmp_path / "out")], check=True)


def test_an_input_that_links_into_the_output_fails_alone_and_is_not_overwritten(model, tmp_path):
    em_nifti_scans(tmp_path / "out" / "data", ["scan"])  # a file already in the output folder
    em_nifti_scans(tmp_path / "in", ["plain"])
    (tmp_path / "in" / "data").mkdir()
    (tmp_path / "in" / "data" / "scan.nii.gz").symlink_to(tmp_path / "out" / "data" / "scan.nii.gz")
    before = (tmp_path / "out" / "data" / "scan.nii.gz").read_bytes()
    report = segment_folder(Predictor(model), tmp_path / "in", tmp_path / "out", progress=False)
    status = {r.case: r for r in report.records}
    assert status["data/scan"].status == "failed" and "is a link into the output folder" in status["data/scan"].reason
    assert status["plain"].status == "written"
    assert (tmp_path / "out" / "data" / "scan.nii.gz").read_bytes() == before


@pytest.mark.parametrize("linked", [".medseg", ".medseg/journal", ".medseg/ledger", "logs"])
def test_medsegs_own_folders_linked_elsewhere_never_write_or_delete_outside(model, tmp_path, monkeypatch, linked):
    em_nifti_scans(tmp_path / "in", ["a"])
    out, user = tmp_path / "out", tmp_path / "user"
    user.mkdir()
    (user / "probe").write_text("precious")
    link = out / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(user)
    real = Predictor.predict

    def predict(self, scan, probabilities=False):
        if linked == "logs":
            raise RuntimeError("unplanned")  # so a traceback would be logged
        return real(self, scan, probabilities)

    monkeypatch.setattr(Predictor, "predict", predict)
    try:
        report = segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
        reason = report.records[0].reason
        assert report.records[0].status == "failed" and ("outside the output folder" in reason or "unplanned" in reason)
    except medseg.errors.MedsegError as exc:  # refused before the batch: the journal itself would leave the folder
        assert "outside the output folder" in str(exc)
    assert sorted(p.name for p in user.iterdir()) == ["probe"] and (user / "probe").read_text() == "precious"


def test_an_output_behind_a_link_loop_is_one_sentence(model, tmp_path, capsys):
    em_nifti_scans(tmp_path / "in", ["a"])
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code = main(
        [
            "predict",
            "--checkpoint",
            str(model),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "loop" / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "cannot be resolved" in err and "Traceback" not in err


def test_a_journal_entry_torn_by_a_full_disk_is_removed_at_once(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd):
            self.handle = real_fdopen(fd, "w")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medseg.files.os, "fdopen", lambda fd, mode="r": Full(fd))
    with pytest.raises(OSError, match="No space"):
        with medseg.files.atomic_path(tmp_path / "mask.nii.gz") as tmp:
            tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []  # no entry, no temporary file


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)


def test_no_two_cases_or_slices_write_the_same_mask(model, tmp_path):
    """A stack a/s (slices s1, s2) claims a/s/s1.png for its PNG masks; a lone image a/s/s1.png gets another
    id. Slices 1.png and 1.PNG of one stack get two masks. Ids differing only in case stay apart on any share."""
    _png(tmp_path / "in" / "a" / "s1.png", 1)
    _png(tmp_path / "in" / "a" / "s2.png", 2)
    _png(tmp_path / "in" / "a" / "s" / "s1.png", 3)
    for name in ("1.png", "1.PNG", "2.png"):
        _png(tmp_path / "in" / "x" / name, 4)
    _png(tmp_path / "in" / "C.png", 5)
    _png(tmp_path / "in" / "c.png", 6)
    out = tmp_path / "out"
    report = segment_folder(Predictor(model), tmp_path / "in", out, formats=["png"], progress=False)
    assert report.counts() == {"written": 5, "skipped": 0, "failed": 0}, report.records
    outputs = [o.casefold() for r in report.records for o in r.outputs]
    assert len(outputs) == len(set(outputs)) == 2 + 1 + 3 + 2
    again = segment_folder(Predictor(model), tmp_path / "in", out, formats=["png"], progress=False)
    assert again.counts() == {"written": 0, "skipped": 5, "failed": 0}  # the batch settles: nothing overwrote anything


def test_rewriting_the_review_page_removes_only_its_own_old_case_files(model, tmp_path):
    from medseg.review import DATA_FOLDER

    em_nifti_scans(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
    data = out / DATA_FOLDER
    own = sorted(p.name for p in data.glob("case-*.js"))
    assert len(own) == 2
    users = {data / "case-notes.js": b"// mine", data / "case-9999.js": b"// mine too"}
    for path, content in users.items():
        path.write_bytes(content)
    (tmp_path / "in" / "b.nii.gz").unlink()  # the next page shows one case (b's mask is an orphan now)
    segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
    assert sorted(p.name for p in data.glob("case-0*.js")) == own[:1]
    assert all(path.read_bytes() == content for path, content in users.items())


def test_an_output_folder_held_by_a_live_run_is_refused_and_a_stale_lock_taken_over(model, tmp_path):
    from medseg.pipeline import LOCK_FILE, OutputBusy, output_lock

    em_nifti_scans(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusy, match=rf"being written by process {os.getpid()} on {socket.gethostname()}"):
            segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
        assert not (out / "a.nii.gz").exists()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "now"}))
    with pytest.raises(OutputBusy, match=r"elsewhere.example.*if it is gone, remove .*lock"):
        segment_folder(Predictor(model), tmp_path / "in", out, progress=False)
    proc = subprocess.Popen(["true"])
    proc.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "started": "then"}))
    report = segment_folder(Predictor(model), tmp_path / "in", out, progress=False)  # stale: taken over
    assert report.counts()["written"] == 1 and not (out / LOCK_FILE).exists()


def test_once_the_disk_is_full_no_further_scan_does_model_work(model, tmp_path, monkeypatch, capsys):
    em_nifti_scans(tmp_path / "in", ["a", "b", "c"])
    predicted = []
    real_predict, real_usage = Predictor.predict, shutil.disk_usage

    def predict(self, scan, probabilities=False):
        predicted.append(scan.ref.id)
        return real_predict(self, scan, probabilities)

    def usage(path):
        total = real_usage(path)
        return total._replace(free=1000) if predicted else total  # full once the first scan ran

    monkeypatch.setattr(Predictor, "predict", predict)
    monkeypatch.setattr(medseg.pipeline.output.shutil, "disk_usage", usage)
    code = main(
        ["predict", "--checkpoint", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "stopped early" in err and "scan b may need up to" in err
    assert predicted == ["a"]


def test_a_dicom_object_the_series_cannot_have_leaves_the_other_masks_and_a_sentence(model, tmp_path):
    """A slice with no patient geometry (position, orientation): no RTSTRUCT can place contours; the NIfTI mask
    is written and the record says why the RTSTRUCT is not. Asked for an RTSTRUCT alone, the scan fails."""
    paths = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(40, 36, 1), seed=2), tmp_path / "in" / "flat")
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
            delattr(ds, keyword)
        ds.save_as(path)
    both = segment_folder(Predictor(model), tmp_path / "in", tmp_path / "out", ["nifti", "rtstruct"], False, False)
    (record,) = both.records
    assert record.status == "written" and [Path(p).name for p in record.outputs] == ["flat.nii.gz"]
    assert any(n.startswith("rtstruct not written:") and "patient geometry" in n for n in record.notes), record.notes
    alone = segment_folder(Predictor(model), tmp_path / "in", tmp_path / "rt", ["rtstruct"], False, False)
    assert alone.records[0].status == "failed" and "patient geometry" in alone.records[0].reason
