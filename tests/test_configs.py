"""The configs shipped in configs/: they validate, build their models, and the 3D one trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medseg.cli import main
from medseg.config import load_config
from medseg.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "model" in yaml.safe_load(p.read_text()))
EM_CONFIGS = ("unet_em.yaml", "segnet_em.yaml", "fcn8s_em.yaml")


def test_every_model_the_issue_names_has_a_config():
    names = {p.name for p in TRAINING_CONFIGS}
    assert {*EM_CONFIGS, "unet3d_phantom.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_its_model_takes_its_patch(path):
    config = load_config(path)
    model = build_model(config.model).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, config.model.in_channels, *config.train.patch_size))
    assert out.shape == (1, config.model.out_channels, *config.train.patch_size)
    assert config.model.out_channels == len(config.data.classes)


def test_em_configs_share_data_split_augmentation_and_budget():
    configs = [load_config(CONFIGS / name) for name in EM_CONFIGS]
    assert {c.model.name for c in configs} == {"unet", "segnet", "fcn8s"}
    for c in configs:
        assert c.data.dataset == "isbi2012_em" and c.data.split.mode == "manifest"
        assert c.data.classes == {"membrane": 0, "cell": 255}
        assert (c.augment.grid_size, c.augment.sigma) == (3, 10.0)  # the U-Net paper's law
    for section in ("data", "preprocess", "augment", "train", "infer"):
        assert len({getattr(c, section).model_dump_json() for c in configs}) == 1, section


def test_unet3d_phantom_config_trains_as_its_comment_says(tmp_path, capsys):
    data = tmp_path / "phantom_ct"
    assert main(["data", "phantom", str(data), "--cases", "4"]) == 0
    overrides = [
        f"data.images={data / 'imagesTr'}",
        f"data.labels={data / 'labelsTr'}",
        f"output_dir={tmp_path / 'runs'}",
        "train.epochs=1",
        "train.steps_per_epoch=3",
    ]
    args = ["train", "--config", str(CONFIGS / "unet3d_phantom.yaml")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    assert (tmp_path / "runs" / "unet3d_phantom" / "best.pt").is_file()
    assert "Best epoch 1" in capsys.readouterr().out
