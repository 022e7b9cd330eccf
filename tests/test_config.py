"""Configs: every error names the file and the dotted key; overrides; relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import load_config
from medseg.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "model:\n  name: unet\n"))
    assert cfg.model.name == "unet" and cfg.model.spatial_dims == 2
    assert cfg.train.epochs == 50 and cfg.infer.overlap == 0.5
    assert cfg.source == (tmp_path / "exp.yaml").resolve()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: {name: unet}\ntrain: {epoks: 3}\n", "train.epoks: unknown key"),
        ("model: {name: unet}\ntrain: {epochs: many}\n", "train.epochs: Input should be a valid integer"),
        ("model: {name: unet, spatial_dims: 4}\n", "model.spatial_dims: Input should be 2 or 3"),
        ("train: {epochs: 3}\n", "model: required value is missing"),
        ("model: {spatial_dims: 2}\n", "model.name: required value is missing"),
        ("model: {name: unet}\ndata: {classes: {a: 0, b: 0}}\n", "data.classes"),
        ("model: {name: unet}\ndata: {dataset: x, images: y}\n", "give one data source"),
        ("model: {name: unet}\ndata: {split: {mode: kfold, folds: 3, fold: 3}}\n", "data.split"),
        ("model: {name: unet}\ninfer: {overlap: 1.5}\n", "infer.overlap"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("model: {name: unet\n", "not valid YAML at line"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message


def test_dotted_overrides(tmp_path):
    path = _write(tmp_path, "model: {name: unet}\ntrain: {epochs: 10}\n")
    cfg = load_config(
        path, ["train.epochs=5", "infer.roi_size=[64, 96]", "model.options.dropout=0.5", "infer.tta=true"]
    )
    assert cfg.train.epochs == 5
    assert cfg.infer.roi_size == [64, 96]
    assert cfg.model.options == {"dropout": 0.5}
    assert cfg.infer.tta is True
    with pytest.raises(ConfigError, match=r"train\.epoks: unknown key"):
        load_config(path, ["train.epoks=5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs is a value, not a section"):
        load_config(path, ["train.epochs.x=1"])


def test_paths_resolve_relative_to_config_file(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = sub / "exp.yaml"
    path.write_text("model: {name: unet}\ndata: {images: ../data/images, labels: /abs/labels}\noutput_dir: runs/a\n")
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(path)
    assert cfg.data.images == tmp_path / "data" / "images"
    assert cfg.data.labels == Path("/abs/labels")
    assert cfg.output_dir == sub / "runs" / "a"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_command_shows_overrides_and_errors(tmp_path, capsys):
    path = _write(tmp_path, "model: {name: unet}\n")
    assert main(["config", str(path), "--set", "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert main(["config", str(path), "--set", "train.epoks=7"]) == 1
    err = capsys.readouterr().err
    assert "train.epoks: unknown key" in err and str(path) in err
