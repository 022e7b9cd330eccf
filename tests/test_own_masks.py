"""A user's file at a mask's name survives `medseg predict`; medseg's own masks are still redone when stale
(issue #15 item 2). The ledger names a case's masks before they are written, so a run killed between a
mask and its record leaves a mask the next run knows as its own."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg.pipeline.ledger
from medseg.cli import main
from medseg.data import phantoms
from medseg.export import export_mask, mask_paths
from medseg.inference.predictor import Predictor
from medseg.ingest import discover, load
from medseg.pipeline.ledger import LEDGER_DIR

from conftest import em_nifti_scans

REFUSED = "exists and medseg did not write it; move it away, or rerun with --overwrite to replace it"


def _predict(model: Path, inputs: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(model), "--input", str(inputs), "--output", str(out), *extra])


def _record(out: Path, case: str) -> dict:
    return json.loads((out / LEDGER_DIR / f"{case}.json").read_text())


def test_mask_paths_are_the_files_export_mask_writes(tmp_path):
    """One list of names for the check before the model runs and for the writer: NIfTI, TIFF, PNG slices of
    a stack (named like its images), the PNG of a 2D image, and numbered PNG slices of a volume."""
    em = phantoms.em_phantom(shape=(40, 40, 3), cells=6, seed=2)
    phantoms.write_png_sequence(em.image, tmp_path / "in" / "stack", prefix="s")
    phantoms.write_nifti(em.image, em.affine, tmp_path / "in" / "vol.nii.gz")
    phantoms.write_png_sequence(em.image[:, :, :1], tmp_path / "in" / "flat", prefix="one")
    out = tmp_path / "out"
    written = {}
    for ref in discover(tmp_path / "in").scans:
        scan = load(ref)
        formats = ("nifti", "tiff", "png")
        planned = [p for paths in mask_paths(out, ref, scan.geometry.shape, formats).values() for p in paths]
        mask = np.zeros(scan.geometry.shape, np.uint8)
        assert export_mask(mask, scan, out, {"background": 0}, formats) == planned, ref.id
        written[ref.id] = sorted(p.relative_to(out).as_posix() for p in planned if p.suffix == ".png")
    assert written["stack/s"] == ["stack/s/s0.png", "stack/s/s1.png", "stack/s/s2.png"]
    assert written["vol"] == ["vol/0.png", "vol/1.png", "vol/2.png"]
    assert [v for k, v in written.items() if k.startswith("flat")] == [["flat/one0.png"]]


def test_a_users_file_at_a_mask_name_survives_and_only_its_scan_fails(tiny_em_run, tmp_path, capsys, monkeypatch):
    em_nifti_scans(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "a.nii.gz"
    mine.write_bytes(b"my manual segmentation, not medseg's")
    predicted = []
    real = Predictor.predict

    def predict(self, scan, probabilities=False):
        predicted.append(scan.ref.id)
        return real(self, scan, probabilities)

    monkeypatch.setattr(Predictor, "predict", predict)
    assert _predict(tiny_em_run, tmp_path / "in", out) == 1
    console = capsys.readouterr().out
    assert f"FAILED a: {mine}: {REFUSED}" in console, console
    assert "1 written, 0 skipped (up to date), 1 failed" in console
    assert mine.read_bytes() == b"my manual segmentation, not medseg's"
    assert nib.load(out / "b.nii.gz").shape[:2] == (40, 40)
    assert predicted == ["b"]  # the refused scan costs no model work
    assert not (out / LEDGER_DIR / "a.json").exists()

    assert _predict(tiny_em_run, tmp_path / "in", out, "--overwrite") == 0  # asked to: replaced
    assert nib.load(mine).shape[:2] == (40, 40)
    capsys.readouterr()
    assert _predict(tiny_em_run, tmp_path / "in", out) == 0  # now medseg's own: up to date
    assert "0 written, 2 skipped" in capsys.readouterr().out


def test_a_stale_mask_of_ours_is_redone_without_overwrite(tiny_em_run, tmp_path, capsys):
    em_nifti_scans(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    assert _predict(tiny_em_run, tmp_path / "in", out) == 0
    good = (out / "a.nii.gz").read_bytes()
    (out / "a.nii.gz").write_bytes(good[: len(good) // 2])  # truncated by a full disk, or edited by hand
    capsys.readouterr()
    assert _predict(tiny_em_run, tmp_path / "in", out) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert (out / "a.nii.gz").read_bytes() == good


def test_a_run_killed_between_a_mask_and_its_record_is_redone(tiny_em_run, tmp_path, monkeypatch, capsys):
    """The kill is simulated where it hurts: the intent is recorded and the mask renamed into place, then the
    process dies before `remember`. The next run finds a pending entry: the mask is medseg's, not intact."""

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    em_nifti_scans(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    monkeypatch.setattr(medseg.pipeline.ledger, "remember", killed)
    with pytest.raises(Killed):
        _predict(tiny_em_run, tmp_path / "in", out)
    monkeypatch.undo()
    assert (out / "a.nii.gz").is_file()
    assert _record(out, "a")["outputs"] == [{"path": "a.nii.gz", "pending": True}]
    capsys.readouterr()
    assert _predict(tiny_em_run, tmp_path / "in", out) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
    (entry,) = _record(out, "a")["outputs"]
    assert entry["path"] == "a.nii.gz" and entry["size"] == (out / "a.nii.gz").stat().st_size


def test_a_mask_of_an_earlier_format_stays_medsegs_own(tiny_em_run, tmp_path, capsys):
    """nifti, then tiff, then nifti again: the first run's a.nii.gz is still named (under ``earlier``) and
    is replaced without --overwrite; an orphan lists every mask its record names."""
    em_nifti_scans(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    assert _predict(tiny_em_run, tmp_path / "in", out, "--format", "nifti") == 0
    assert _predict(tiny_em_run, tmp_path / "in", out, "--format", "tiff") == 0
    assert _record(out, "a")["earlier"] == ["a.nii.gz"]
    capsys.readouterr()
    assert _predict(tiny_em_run, tmp_path / "in", out, "--format", "nifti") == 0
    assert "1 written, 0 skipped, 0 failed" in capsys.readouterr().out.replace(" (up to date)", "")
    assert _record(out, "a")["earlier"] == ["a.tif"]
    (tmp_path / "in" / "a.nii.gz").unlink()
    em_nifti_scans(tmp_path / "in", ["other"])
    _predict(tiny_em_run, tmp_path / "in", out, "--format", "nifti")
    assert (
        f"orphan a: its input {tmp_path / 'in' / 'a.nii.gz'} is gone; kept a.nii.gz, a.tif" in capsys.readouterr().out
    )
