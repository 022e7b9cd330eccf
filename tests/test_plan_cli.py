"""`medseg plan` and `medseg train --images`: a commented config that loads back, plan -> train -> predict on
CT phantoms, and malformed inputs refused in one sentence."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.data import phantoms
from medseg.training.checkpoint import load_checkpoint
from medseg.cli import main
from medseg.config import load_config

# Tiny epochs of a narrow model on small windows: the wiring is under test here, the planned values in test_plan_rules.
TINY = [
    *("--set", "model.features=4", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2"),
    *("--set", "train.patch_size=[32,32,16]", "--set", "infer.roi_size=[48,48,32]", "--set", "infer.tta=false"),
]


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    phantoms.write_ct_dataset(root / "ct", cases=4)
    return root


def test_plan_writes_a_commented_config_that_loads_back_as_planned(ct_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images, labels = ct_data / "ct" / "imagesTr", ct_data / "ct" / "labelsTr"
    code = main(["plan", "--images", str(images), "--labels", str(labels), "--modality", "CT"])
    assert code == 0
    out = capsys.readouterr().out
    config_path, fingerprint_path = tmp_path / "configs" / "ct.yaml", tmp_path / "configs" / "ct.fingerprint.json"
    assert f"Plan: {Path('configs/ct.yaml')}" in out and "medseg train --config" in out
    text = config_path.read_text()
    lines = text.splitlines()
    for index, line in enumerate(lines):  # every value sits under the comment that says why
        if re.match(r"^\s*[a-z_]+: \S", line):
            assert lines[index - 1].lstrip().startswith("#"), line
    raw = yaml.safe_load(text)
    assert not Path(raw["data"]["images"]).is_absolute()  # relative to the config's folder, so the pair moves along
    config = load_config(config_path)  # an ordinary config: relative paths resolve against its folder
    assert config.data.images == images and config.data.labels == labels
    assert config.output_dir == tmp_path / "runs" and config.name == "ct"
    fingerprint = json.loads(fingerprint_path.read_text())
    assert fingerprint["format"] == "medseg-fingerprint/1" and len(fingerprint["cases"]) == 4
    stats = fingerprint["intensity"][0]
    assert config.preprocess.intensity == "dataset_zscore"
    assert config.preprocess.channel_stats[0].model_dump() == {
        "low": stats["p00_5"],
        "high": stats["p99_5"],
        "mean": stats["mean"],
        "std": stats["std"],
    }
    assert config.model.spatial_dims == 3 and config.data.classes == {
        "background": 0,
        "class_1": 1,
        "class_2": 2,
        "class_3": 3,
    }
    assert main(["config", str(config_path)]) == 0  # `medseg config` reads it like any other
    capsys.readouterr()
    assert main(["plan", "--images", str(images), "--labels", str(labels)]) == 1  # never over a user's edits
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["plan", "--images", str(images), "--labels", str(labels), "--overwrite"]) == 0
    assert load_config(config_path).preprocess.intensity == "zscore"  # NIfTI without --modality: unknown
    assert "--modality CT" in config_path.read_text()  # ... but it looks like CT, and the plan says so


def test_train_from_a_folder_plans_into_the_run_folder_and_predicts(ct_data, tmp_path, monkeypatch, capsys):
    """plan -> train -> predict: the run folder holds the plan and its fingerprint, the checkpoint carries
    exactly that config, and the masks land on each scan's own grid."""
    monkeypatch.chdir(tmp_path)
    images, labels = ct_data / "ct" / "imagesTr", ct_data / "ct" / "labelsTr"
    argv = ["train", "--images", str(images), "--labels", str(labels), "--name", "ctrun", "--modality", "CT", *TINY]
    assert main(argv) == 0
    run = tmp_path / "runs" / "ctrun"
    assert (run / "config.yaml").is_file() and (run / "fingerprint.json").is_file() and (run / "best.pt").is_file()
    assert "Planned" in capsys.readouterr().out
    planned = load_config(run / "config.yaml")
    assert planned.train.epochs == 1 and "set on the command line" in (run / "config.yaml").read_text()
    assert load_checkpoint(run / "best.pt").config.dump() == planned.dump()
    assert main(argv) == 1  # a second run into the same folder is refused before the plan is rewritten
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(run), "--input", str(images / "case_001_0000.nii.gz"),
                 "--output", str(tmp_path / "masks")]) == 0  # fmt: skip
    mask = nib.load(tmp_path / "masks" / "case_001_0000.nii.gz")
    scan = nib.load(images / "case_001_0000.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 3}


def _write_case(folder: Path, name: str, shape=(12, 10, 6)) -> None:
    ct = phantoms.ct_phantom(shape=shape)
    phantoms.write_nifti(ct.image, ct.affine, folder / "images" / f"{name}.nii.gz")
    phantoms.write_nifti(ct.label, ct.affine, folder / "labels" / f"{name}.nii.gz")


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--images", "{d}/nowhere", "--labels", "{d}/labels"], "--images .*nowhere: no such folder"),
        ("case", ["--images", "{d}/images"], "needs --labels DIR"),
        ("case", ["--images", "{d}/images", "--labels", "{d}/labels", "--out", "{d}/plan.txt"], "a .yaml file"),
        ("case", ["--images", "{d}/images", "--labels", "{d}/labels", "--modality", "CT,MR"], "2 modalities"),
        ("extra_label", ["--images", "{d}/images", "--labels", "{d}/labels"], "no image with the same case name"),
        ("shifted", ["--images", "{d}/images", "--labels", "{d}/labels"], "label grid does not match its image"),
        ("empty", ["--images", "{d}/images", "--labels", "{d}/labels"], "no scans found"),
        ("corrupt", ["--images", "{d}/images", "--labels", "{d}/labels"], "bad.nii.gz"),
        ("case", ["--images", "{d}/images", "--labels", "{d}/labels", "--memory-gb", "-1"], "positive number"),
        ("case", ["--csv", "{d}/cases.csv"], "--csv .*cases.csv: no such file"),
    ],
)
def test_malformed_inputs_are_refused_in_one_line(tmp_path, monkeypatch, capsys, setup, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels").mkdir()
    (tmp_path / "images").mkdir()
    if setup in ("case", "extra_label", "shifted", "corrupt"):
        _write_case(tmp_path, "a")
    if setup == "extra_label":
        _write_case(tmp_path, "b")
        (tmp_path / "images" / "b.nii.gz").unlink()
    if setup == "shifted":
        ct = phantoms.ct_phantom(shape=(12, 10, 7))
        phantoms.write_nifti(ct.label, ct.affine, tmp_path / "labels" / "a.nii.gz")
    if setup == "corrupt":
        (tmp_path / "images" / "bad.nii.gz").write_bytes(b"not a nifti file at all")
    code = main(["plan", *[a.format(d=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 1 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("medseg plan: error: ") and "Traceback" not in err
    assert not (tmp_path / "configs").exists()  # nothing half-written


def test_an_interrupted_planned_training_says_where_it_stands(tmp_path):
    """Ctrl+C while `train --images` still plans: start again; once training runs: resume the run folder."""
    import argparse

    from medseg.cli import _resume_hint

    args = argparse.Namespace(command="train", config=None, resume=None, overrides=[])
    assert "while planning" in _resume_hint(args, started=0.0)
    args.run_dir = tmp_path / "runs" / "x"
    (args.run_dir).mkdir(parents=True)
    (args.run_dir / "latest.pt").write_bytes(b"")
    assert f"--resume {args.run_dir}" in _resume_hint(args, started=0.0)


def test_train_needs_one_source_and_refuses_planning_options_with_a_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: unet}\n")
    cases = [
        (["train"], "give --config CONFIG, or a data source"),
        (["train", "--config", str(config), "--name", "x"], "--name plans a config from a data source"),
        (["train", "--config", str(config), "--images", str(tmp_path)], "not both"),
        (["train", "--images", str(tmp_path), "--labels", str(tmp_path), "--resume", str(tmp_path)], "no config.yaml"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
