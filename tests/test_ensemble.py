"""Cross-validation and ensembles: `train --fold all`, `predict --checkpoint A B` / a run of folds,
and `predict --config C --split val` predicting exactly the cases the run recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main
from medseg.config import config_from_dict
from medseg.data import phantoms
from medseg.data.recorded_split import SplitRecordError, read_split
from medseg.errors import ConfigError
from medseg.files import sha256_file
from medseg.inference.ensemble import Ensemble, EnsembleError, load_predictor
from medseg.inference.predictor import Predictor, inference_settings
from medseg.ingest import discover, load
from medseg.pipeline import segment_folder
from medseg.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medseg.training.folds import fold_config

from conftest import tiny_em_config, write_em_pairs

SLICES = 6
FOLDS = 3


def _variant(source: Path, target: Path, noise: float = 0.0, **changes) -> Path:
    """A copy of a checkpoint with its learned weights jittered (``noise`` x each tensor's std, seeded) and/or
    config keys changed (``changes``: section -> values), written as a medseg checkpoint."""
    state = load_checkpoint(source)
    generator = torch.Generator().manual_seed(5)
    weights = {
        k: v + noise * v.float().std().nan_to_num() * torch.randn(v.shape, generator=generator)
        if noise and v.is_floating_point() and v.numel() > 1 and "running_" not in k  # norm statistics stay valid
        else v
        for k, v in state.weights.items()
    }
    raw = state.config.dump()
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    save_checkpoint(Checkpoint(config_from_dict(raw), weights), target)
    return target


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    truth = phantoms.ct_phantom(shape=(40, 36, 20), oblique=(8.0, -5.0, 12.0), seed=21)
    phantoms.write_nifti(truth.image, truth.affine, folder / "in" / "ct.nii.gz")
    return folder / "in", load(discover(folder / "in").scans[0])


def test_an_ensemble_averages_its_members_probabilities(ct_model, ct_scan, tmp_path):
    other = _variant(ct_model / "best.pt", tmp_path / "b" / "best.pt", noise=0.5)
    first, second = Predictor(ct_model, device="cpu"), Predictor(other, device="cpu")
    ensemble = Ensemble([ct_model, tmp_path / "b"], device="cpu")
    assert ensemble.checkpoint_files == (ct_model / "best.pt", other)
    scan = ct_scan[1]

    # model space: the mean of the members' softmax, and the mask is its argmax
    data = ensemble.prepare(scan)
    p_a, p_b = first.model_probabilities(data), second.model_probabilities(data)
    assert (p_a - p_b).abs().max() > 0.2  # two really different models, else the mean proves nothing
    got = ensemble.predict(scan, probabilities=True)
    np.testing.assert_array_equal(got.mask, first.finish((p_a + p_b) / 2, data).mask)

    # on the scan's grid, against the two Predictors' own probabilities (stored as float16)
    own_a, own_b = first.predict(scan, probabilities=True), second.predict(scan, probabilities=True)
    prob_a, prob_b = own_a.probabilities.astype(np.float32), own_b.probabilities.astype(np.float32)
    assert got.probabilities.shape == prob_a.shape == (4, *scan.array.shape[1:])
    np.testing.assert_allclose(got.probabilities.astype(np.float32), (prob_a + prob_b) / 2, atol=2e-3)
    assert (got.mask != own_a.mask).any() or (got.mask != own_b.mask).any()  # not simply one member's mask


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"preprocess": {"spacing": [1.0, 1.0, 2.0]}}, "preprocessing (preprocess)"),
        ({"data": {"classes": {"background": 0, "liver": 1, "kidney": 2, "bone": 3}}}, "classes"),
    ],
)
def test_members_that_disagree_are_refused_naming_both(ct_model, tmp_path, changes, what):
    other = _variant(ct_model / "best.pt", tmp_path / "other.pt", **changes)
    with pytest.raises(EnsembleError) as info:
        Ensemble([ct_model, other], device="cpu")
    message = str(info.value)
    assert str(ct_model / "best.pt") in message and str(other) in message and what in message
    assert "\n" not in message


def test_the_same_checkpoint_twice_is_refused(ct_model):
    with pytest.raises(EnsembleError, match="same checkpoint file"):
        Ensemble([ct_model, ct_model / "best.pt"], device="cpu")


def test_the_skip_key_covers_every_member(ct_model, ct_scan, tmp_path):
    other = _variant(ct_model / "best.pt", tmp_path / "b.pt", noise=0.5)
    input_dir, _ = ct_scan
    out = tmp_path / "out"
    pair = load_predictor([ct_model, other], device="cpu")
    report = segment_folder(pair, input_dir, out, formats=["nifti"], progress=False)
    assert report.counts()["written"] == 1
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["checkpoint_files"] == [str(ct_model / "best.pt"), str(other)]
    again = segment_folder(load_predictor([other, ct_model], device="cpu"), input_dir, out, ["nifti"], progress=False)
    assert again.counts()["skipped"] == 1  # the same members in another order: the same average
    _variant(ct_model / "best.pt", other, noise=0.6)  # one member retrained
    redone = segment_folder(load_predictor([ct_model, other], device="cpu"), input_dir, out, ["nifti"], progress=False)
    assert redone.counts()["written"] == 1
    alone = segment_folder(Predictor(ct_model, device="cpu"), input_dir, out, ["nifti"], progress=False)
    assert alone.counts()["written"] == 1  # one member dropped: another model


# --- cross-validation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """`medseg train --config C --fold all` on six EM phantom slices, three folds of one epoch."""
    root = tmp_path_factory.mktemp("cv")
    write_em_pairs(root, slices=SLICES)
    config = tiny_em_config(
        root, root / "runs", "cv", epochs=1, steps_per_epoch=2, data={"split": {"mode": "kfold", "folds": FOLDS}}
    )
    path = root / "cv.yaml"
    path.write_text(yaml.safe_dump(config.dump()))
    assert main(["train", "--config", str(path), "--fold", "all"]) == 0
    return path, root / "runs" / "cv", root


def test_fold_all_trains_k_folds_whose_validation_sets_partition_the_cases(folds_run):
    _, run, _ = folds_run
    cases = {f"s{i}" for i in range(SLICES)}
    vals = []
    for k in range(FOLDS):
        split = json.loads((run / f"fold-{k}" / "split.json").read_text())
        assert (split["mode"], split["fold"], split["folds"]) == ("kfold", k, FOLDS)
        assert set(split["train"]) | set(split["val"]) == cases and not set(split["train"]) & set(split["val"])
        assert load_checkpoint(run / f"fold-{k}").config.data.split.fold == k
        vals.append(set(split["val"]))
    assert set().union(*vals) == cases and sum(map(len, vals)) == SLICES  # every case held out exactly once
    record = json.loads((run / "folds.json").read_text())
    assert record["folds"] == FOLDS and sorted(record["finished"]) == ["0", "1", "2"]
    assert 0.0 <= record["mean_metrics"]["mean_dice"] <= 1.0


def test_fold_all_refuses_to_overwrite_and_resumes_only_unfinished_folds(folds_run, capsys):
    path, run, _ = folds_run
    assert main(["train", "--config", str(path), "--fold", "all"]) == 1
    assert f"--resume {run}" in capsys.readouterr().err
    # fold 2 lost (never finished): --resume keeps folds 0 and 1 as they are and trains fold 2 again
    before = {k: sha256_file(run / f"fold-{k}" / "best.pt") for k in (0, 1)}
    shutil.rmtree(run / "fold-2")
    record = json.loads((run / "folds.json").read_text())
    del record["finished"]["2"]
    (run / "folds.json").write_text(json.dumps(record))
    assert main(["train", "--config", str(path), "--fold", "all", "--resume", str(run)]) == 0
    assert {k: sha256_file(run / f"fold-{k}" / "best.pt") for k in (0, 1)} == before
    assert (run / "fold-2" / "best.pt").is_file() and read_split(run / "fold-2").fold == 2
    assert sorted(json.loads((run / "folds.json").read_text())["finished"]) == ["0", "1", "2"]


def test_fold_needs_a_kfold_split_and_an_existing_fold(tmp_path):
    write_em_pairs(tmp_path, slices=2)
    config = tiny_em_config(tmp_path, tmp_path / "runs", "x", epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="data.split.mode is 'cases'; set it with --set data.split.mode=kfold"):
        fold_config(config, 0)
    kfold = tiny_em_config(tmp_path, tmp_path / "runs", "x", 1, 1, data={"split": {"mode": "kfold", "folds": 3}})
    with pytest.raises(ConfigError, match="folds are 0..2"):
        fold_config(kfold, 3)
    one = fold_config(kfold, 2)
    assert (one.output_dir, one.name, one.data.split.fold) == (tmp_path / "runs" / "x", "fold-2", 2)


def test_a_run_folder_of_folds_is_an_ensemble(folds_run, tmp_path, capsys):
    _, run, root = folds_run
    predictor = load_predictor([run], device="cpu")
    assert isinstance(predictor, Ensemble)
    assert predictor.checkpoint_files == tuple(run / f"fold-{k}" / "best.pt" for k in range(FOLDS))
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(run), "--input", str(root / "images"), "--output", str(out)])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["counts"] == {"written": 1, "skipped": 0, "failed": 0}  # the slices are one PNG sequence
    assert manifest["checkpoint_files"] == [str(f) for f in predictor.checkpoint_files]


def _ledger_sha(out: Path, case: str) -> str:
    return json.loads((out / ".medseg" / "ledger" / f"{case}.json").read_text())["checkpoint_sha256"]


def test_split_val_of_folds_predicts_each_case_by_the_fold_that_held_it_out(folds_run, tmp_path, capsys):
    path, run, _ = folds_run
    out = tmp_path / "oof"
    assert main(["predict", "--config", str(path), "--split", "val", "--output", str(out)]) == 0
    assert "out-of-fold" in capsys.readouterr().out
    manifest = json.loads((out / "predictions.json").read_text())
    assert sorted(r["case"] for r in manifest["records"]) == sorted(f"s{i}" for i in range(SLICES))
    for k in range(FOLDS):
        for case in read_split(run / f"fold-{k}").cases("val"):
            assert _ledger_sha(out, case) == sha256_file(run / f"fold-{k}" / "best.pt")

    assert main(["predict", "--config", str(path), "--split", "train", "--output", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "--split val" in err and err.count("\n") == 1  # one sentence


def test_split_val_of_one_run_predicts_exactly_its_recorded_cases(folds_run, tmp_path, capsys):
    _, run, root = folds_run
    fold = run / "fold-1"
    config = load_checkpoint(fold).config
    path = tmp_path / "fold1.yaml"  # the config of the single run fold-1 (its run folder is output_dir/name)
    path.write_text(yaml.safe_dump(config.dump()))
    val = list(read_split(fold).cases("val"))
    out = tmp_path / "val"
    assert main(["predict", "--config", str(path), "--split", "val", "--output", str(out)]) == 0
    manifest = json.loads((out / "predictions.json").read_text())
    assert [r["case"] for r in manifest["records"]] == val and manifest["counts"]["written"] == len(val)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{c}.png" for c in val)

    named = tmp_path / "named"
    assert main(["predict", "--config", str(path), "--cases", "s5", "s0", "--output", str(named)]) == 0
    assert [r["case"] for r in json.loads((named / "predictions.json").read_text())["records"]] == ["s5", "s0"]
    capsys.readouterr()
    assert main(["predict", "--config", str(path), "--cases", "s9", "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "s9" in err and err.count("\n") == 1


def test_an_unknown_or_missing_split_is_one_sentence(folds_run, tmp_path):
    _, run, _ = folds_run
    with pytest.raises(SplitRecordError, match="no split.json"):
        read_split(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "val": "b"}))
    with pytest.raises(SplitRecordError, match="'val' is not a list of case ids"):
        read_split(tmp_path)
    with pytest.raises(SplitRecordError, match="records no 'test' cases"):
        read_split(run / "fold-0").cases("test")


def test_the_skip_key_covers_the_settings_that_shape_a_mask(ct_model, ct_scan, tmp_path):
    """A rerun with another overlap, precision or post-processing redoes the mask; the same settings skip it.
    The flow's key (from the checkpoint's config) is the one a Predictor with no overrides resolves."""
    input_dir, _ = ct_scan
    out = tmp_path / "out"

    def run(**options) -> dict[str, int]:
        return segment_folder(
            Predictor(ct_model, device="cpu", **options), input_dir, out, ["nifti"], progress=False
        ).counts()

    assert run()["written"] == 1 and run()["skipped"] == 1
    assert run(overlap=0.1)["written"] == 1 and run(overlap=0.1)["skipped"] == 1
    assert run(overlap=0.1, precision="fp32")["written"] == 1
    foreground = [name for name, value in Predictor(ct_model, device="cpu").classes.items() if value][0]
    assert run(overlap=0.1, precision="fp32", keep_largest=[foreground])["written"] == 1
    assert run(overlap=0.1, precision="fp32", keep_largest=[foreground])["skipped"] == 1
    assert (
        inference_settings(load_checkpoint(ct_model / "best.pt").config) == Predictor(ct_model, device="cpu").settings
    )
