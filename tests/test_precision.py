"""Precision: which autocast dtype each setting picks, and that training and inference use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medseg.device
import medseg.training.checkpoint
import medseg.training.loop
from medseg.data import phantoms
from medseg.config import config_from_dict
from medseg.device import choose_precision
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor
from medseg.ingest import discover, load
from medseg.training.loop import train

from conftest import tiny_em_config, write_em_pairs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(medseg.device, "cpu_has_native_bf16", lambda: native)
    assert choose_precision("auto", CPU) is expected


def test_explicit_precisions():
    assert choose_precision("fp32", CPU) is None
    assert choose_precision("fp32", CUDA) is None
    assert choose_precision("bf16", CPU) is torch.bfloat16
    assert choose_precision("auto", CUDA) is torch.float16
    assert choose_precision("fp16", CUDA) is torch.float16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*use bf16 or fp32"):
        choose_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="'half' is not one of auto, fp32, bf16, fp16"):
        choose_precision("half", CPU)


def test_precision_is_validated_in_the_config():
    with pytest.raises(ConfigError, match="train.precision"):
        config_from_dict({"model": {"name": "unet"}, "train": {"precision": "fp8"}})


def _spy_dtypes(monkeypatch, module) -> set[torch.dtype]:
    """Record the dtype of every forward output of models that ``module`` builds."""
    seen: set[torch.dtype] = set()
    real = module.build_model

    def build(cfg):
        net = real(cfg)
        net.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        return net

    monkeypatch.setattr(module, "build_model", build)
    return seen


def _em_config(root, out, precision: str):
    return tiny_em_config(
        root,
        out,
        f"em_{precision}",
        epochs=3,
        steps_per_epoch=15,
        train={"precision": precision},
        infer={"precision": precision},
    )


@pytest.fixture(scope="module")
def em_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("em")
    em = write_em_pairs(root, slices=6)
    phantoms.write_png_sequence(em.image[:, :, :2], root / "test" / "stack")
    return root


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_runs_the_model_in_its_precision_and_keeps_fp32_weights(
    em_root, tmp_path, monkeypatch, precision, dtype
):
    seen = _spy_dtypes(monkeypatch, medseg.training.loop)
    result = train(_em_config(em_root, tmp_path, precision), progress=False)
    assert seen == {dtype}  # training steps and the sliding-window validation alike
    losses = result.step_losses
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert result.best_metrics["dice_membrane"] > 0.5
    state = torch.load(result.run_dir / "best.pt", weights_only=True)
    assert {v.dtype for k, v in state["model"].items() if v.is_floating_point()} == {torch.float32}


def test_bf16_inference_matches_fp32(em_root, tmp_path, monkeypatch):
    run = train(_em_config(em_root, tmp_path, "fp32"), progress=False).run_dir
    seen = _spy_dtypes(monkeypatch, medseg.training.checkpoint)  # Predictor builds its model from the checkpoint
    scan = load(discover(em_root / "test").scans[0])
    masks = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        masks[precision] = Predictor(run, device="cpu", precision=precision).predict(scan).mask
        assert seen == {torch.float32 if precision == "fp32" else torch.bfloat16}
    assert np.mean(masks["fp32"] == masks["bf16"]) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_windows_run_in_the_precision_and_blend_in_fp32(dtype):
    from monai.inferers import sliding_window_inference

    from medseg.device import in_precision

    net = torch.nn.Conv2d(1, 2, 1)  # pointwise: every window agrees with the whole image
    seen: set[torch.dtype] = set()
    net.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    image = torch.randn(1, 1, 40, 36)
    blended = sliding_window_inference(image, (16, 16), 2, in_precision(net, CPU, dtype), overlap=0.5, mode="gaussian")
    assert seen == {dtype or torch.float32}
    assert blended.dtype == torch.float32
    with torch.no_grad():
        exact = net(image)
    assert torch.allclose(blended, exact, atol=0.05 if dtype else 1e-5)
