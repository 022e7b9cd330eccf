"""Model zoo: one battery for every registered model, then family-specific checks.

A new model gets the whole battery by registering itself: the battery is parametrized
over ``list_models()`` x (2D, 3D). Widths are tiny so the file runs in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from medseg.errors import ConfigError, MedsegError
from medseg.models import (
    FCN,
    InputSizeError,
    SegNet,
    SegNetBasic,
    UNet,
    build_model,
    list_models,
    model_options,
    model_summary,
    register_model,
    unet_valid_input_size,
    unet_valid_output_size,
)
from medseg.models import registry
from medseg.models.fcn import BilinearUpsample, bilinear_kernel

FEATURES = 4
CASES = [(name, dims) for name in list_models() for dims in (2, 3)]
CASE_IDS = [f"{name}-{dims}d" for name, dims in CASES]


@dataclass
class ModelConfig:
    """Stand-in for medseg.config.ModelConfig: the same fields, as attributes."""

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    features: int = FEATURES
    depth: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


def make(name: str, dims: int, in_channels: int = 1, out_channels: int = 2, seed: int = 0, **options: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name, dims, in_channels, out_channels, options=options))


def small_shape(model: nn.Module, dims: int) -> tuple[int, ...]:
    """The smallest non-square / non-cubic input the model takes."""
    k = model.size_divisor
    return (k, 2 * k) if dims == 2 else (k, k, 2 * k)


# --- the battery: every registered model, 2D and 3D ------------------------------------


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
class TestEveryModel:
    def test_output_shape_odd_channels_non_square(self, name: str, dims: int) -> None:
        model = make(name, dims, in_channels=3, out_channels=5).eval()
        k = model.size_divisor
        assert isinstance(k, int) and k > 1
        assert (model.spatial_dims, model.in_channels, model.out_channels) == (dims, 3, 5)
        spatial = (2 * k, 3 * k) if dims == 2 else (k, 2 * k, 3 * k)  # e.g. 64x96, 32x64x96
        with torch.no_grad():
            y = model(torch.randn(1, 3, *spatial))
        assert y.shape == (1, 5, *spatial)
        assert torch.isfinite(y).all()

    def test_backward_reaches_every_parameter(self, name: str, dims: int) -> None:
        model = make(name, dims, in_channels=3, out_channels=5).train()
        x = torch.randn(2, 3, *small_shape(model, dims))
        model(x).square().mean().backward()
        params = dict(model.named_parameters())
        assert params
        no_grad = [n for n, p in params.items() if p.grad is None]
        assert not no_grad, f"no gradient for {no_grad}"
        not_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
        assert not not_finite, f"non-finite gradient for {not_finite}"
        assert sum(p.grad.abs().sum() for p in params.values()) > 0

    def test_state_dict_round_trip(self, name: str, dims: int, tmp_path) -> None:
        model = make(name, dims, seed=1)
        x = torch.randn(2, 1, *small_shape(model, dims))
        with torch.no_grad():
            model.train()(x)  # moves batch-norm running statistics off their defaults
        model.eval()
        with torch.no_grad():
            expected = model(x)
        path = tmp_path / "weights.pt"
        torch.save(model.state_dict(), path)
        restored = make(name, dims, seed=2)
        restored.load_state_dict(torch.load(path, weights_only=True))
        restored.eval()
        with torch.no_grad():
            assert torch.equal(restored(x), expected)

    def test_eval_mode_is_deterministic(self, name: str, dims: int) -> None:
        model = make(name, dims).eval()
        x = torch.randn(1, 1, *small_shape(model, dims))
        with torch.no_grad():
            assert torch.equal(model(x), model(x))

    def test_bad_input_size_names_the_multiple(self, name: str, dims: int) -> None:
        model = make(name, dims).eval()
        k = model.size_divisor
        spatial = list(small_shape(model, dims))
        spatial[-1] += 2
        with pytest.raises(InputSizeError, match=rf"multiple of {k}\b") as info:
            model(torch.randn(1, 1, *spatial))
        assert str(spatial[-1]) in str(info.value)
        assert isinstance(info.value, MedsegError) and isinstance(info.value, ValueError)

    def test_wrong_channels_or_dims_are_named(self, name: str, dims: int) -> None:
        model = make(name, dims).eval()
        spatial = small_shape(model, dims)
        with pytest.raises(InputSizeError, match="1 input channel"):
            model(torch.randn(1, 2, *spatial))
        with pytest.raises(InputSizeError, match=f"{dims}D model"):
            model(torch.randn(1, *spatial))


# --- registry ------------------------------------------------------------------------


def test_list_models_has_all_families() -> None:
    assert {"unet", "segnet", "segnet_basic", "fcn32s", "fcn16s", "fcn8s"} <= set(list_models())


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vnet'") as info:
        build_model({"name": "vnet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2})
    for name in list_models():
        assert name in str(info.value)


def test_unknown_option_names_option_and_accepted_ones() -> None:
    cfg = ModelConfig("unet", 2, 1, 2, options={"batchnorm": True})
    with pytest.raises(ConfigError, match="'batchnorm'") as info:
        build_model(cfg)
    for option in ("batch_norm", "dropout", "padding"):
        assert option in str(info.value)
    assert model_options("fcn8s") == ["batch_norm", "dropout", "fc_features", "fc_kernel_size"]


def test_build_from_mapping_and_object_agree() -> None:
    cfg = ModelConfig("unet", 3, 2, 3, features=4, depth=2, options={"batch_norm": False, "dropout": 0.0})
    torch.manual_seed(0)
    from_object = build_model(cfg)
    torch.manual_seed(0)
    from_mapping = build_model(vars(cfg))
    assert isinstance(from_object, UNet) and from_object.size_divisor == 4
    assert not any(isinstance(m, nn.BatchNorm3d) for m in from_object.modules())
    for a, b in zip(from_object.state_dict().values(), from_mapping.state_dict().values()):
        assert torch.equal(a, b)


def test_unet_instance_norm_and_width_cap() -> None:
    """norm: instance puts an affine InstanceNorm after every 3x3 convolution (nnU-Net's choice) and
    each sample is normalised alone: its output does not depend on what else is in the batch;
    max_features caps every level's width; the older batch_norm switch still means what it meant."""
    base = {"name": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": 4, "depth": 3}
    net = build_model({**base, "options": {"norm": "instance", "max_features": 12, "dropout": 0.0}})
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 2 * (4 + 3) and all(m.affine for m in norms)  # two per double conv: 4 down, 3 up
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert [block[0][0].out_channels for block in net.encoder] == [4, 8, 12, 12]
    net.train()
    torch.manual_seed(0)
    one, other = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16) * 5 + 3
    with torch.no_grad():
        alone = net(one)
        together = net(torch.cat([one, other]))[:1]
    assert torch.allclose(alone, together, atol=1e-4)
    batch = build_model({**base, "options": {"norm": "batch", "dropout": 0.0}}).train()
    with torch.no_grad():  # batch norm mixes the samples: the same input comes out otherwise
        assert not torch.allclose(batch(one), batch(torch.cat([one, other]))[:1], atol=1e-2)
    plain = build_model({**base, "options": {"norm": "none"}})
    assert not any(isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d)) for m in plain.modules())
    legacy = build_model({**base, "options": {"batch_norm": True}})
    assert sum(isinstance(m, nn.BatchNorm3d) for m in legacy.modules()) == 14
    with pytest.raises(ConfigError, match="batch_norm false turns normalisation off but norm is 'instance'"):
        build_model({**base, "options": {"batch_norm": False, "norm": "instance"}})
    with pytest.raises(ConfigError, match="norm must be one of batch, instance, none"):
        build_model({**base, "options": {"norm": "group"}})
    with pytest.raises(ConfigError, match="max_features"):
        build_model({**base, "options": {"max_features": 2}})


def test_config_errors_are_config_errors() -> None:
    base = {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}
    with pytest.raises(ConfigError, match="fixed depth"):
        build_model({**base, "name": "fcn8s", "depth": 3})
    with pytest.raises(ConfigError, match="padding must be one of same, valid"):
        build_model({**base, "options": {"padding": "reflect"}})
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        build_model({**base, "spatial_dims": 4})
    with pytest.raises(ConfigError, match="'depth' is a top-level model field"):
        build_model({**base, "options": {"depth": 3}})
    with pytest.raises(ConfigError, match="unknown model config field"):
        build_model({**base, "width": 8})
    with pytest.raises(ConfigError, match="missing out_channels"):
        build_model({"name": "unet", "spatial_dims": 2, "in_channels": 1})


def test_register_model_rejects_duplicates_and_registers_new(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(SegNet)

    @register_model("tiny")
    class Tiny(nn.Conv2d):
        def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 8) -> None:
            super().__init__(in_channels, out_channels, 1)

    assert "tiny" in list_models()
    assert isinstance(build_model({"name": "tiny", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}), Tiny)


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_fcn_variants_are_one_class_with_the_stride_fixed_by_the_registry(stride: int) -> None:
    name = f"fcn{stride}s"
    base = {"name": name, "spatial_dims": 2, "in_channels": 1, "out_channels": 2}
    model = build_model({**base, "features": 4})
    assert type(model) is FCN and model.output_stride == stride
    assert "output_stride" not in model_options(name)  # the name fixes it: not a config option
    with pytest.raises(ConfigError, match="'output_stride' is not an option"):
        build_model(
            {"name": name, "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "options": {"output_stride": 8}}
        )
    with pytest.raises(InputSizeError, match=f"FCN-{stride}s needs every spatial size to be a multiple of 32"):
        model(torch.zeros(1, 1, 40, 32))


def test_register_model_refuses_to_fix_an_argument_the_model_does_not_take(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    with pytest.raises(TypeError, match="cannot fix stride"):
        register_model("fcn-typo", stride=8)(FCN)
    with pytest.raises(TypeError, match="cannot fix in_channels"):
        register_model("fcn-typo", in_channels=3)(FCN)


def test_default_parameter_counts() -> None:
    """Width 64 matches the papers' sizes (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        segnet = SegNet(2, 3, 3)
        segnet4 = SegNet(2, 3, 3, depth=4)
        unet = UNet(2, 1, 2, batch_norm=False)
        fcn8s = FCN(2, 3, 21, output_stride=8, batch_norm=False)
        basic = SegNetBasic(2, 3, 11)

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(segnet) == pytest.approx(29.5e6, rel=0.05)  # the SegNet paper's 29.5M
    assert count(segnet4) == pytest.approx(15.27e6, rel=0.10)  # reference 4-stage PyTorch SegNet
    assert count(unet) == pytest.approx(31.0e6, rel=0.05)
    assert count(fcn8s) == pytest.approx(134e6, rel=0.05)  # FCN-8s (VGG16), Long et al.
    assert count(basic) == pytest.approx(1.4e6, rel=0.10)


# --- SegNet ----------------------------------------------------------------------------


@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("name", ("segnet", "segnet_basic"))
def test_segnet_unpools_at_the_pooled_positions(name: str, dims: int) -> None:
    model = make(name, dims).eval()
    assert isinstance(model, (SegNet, SegNetBasic))
    seen: dict[str, Any] = {}
    hooks = [
        model.pools[0].register_forward_hook(lambda m, i, o: seen.update(pre_pool=i[0], indices=o[1])),
        model.unpools[-1].register_forward_hook(lambda m, i, o: seen.update(decoded=i[0], unpooled=o)),
    ]
    with torch.no_grad():
        model(torch.randn(1, 1, *small_shape(model, dims)))
    for h in hooks:
        h.remove()
    unpooled, indices = seen["unpooled"], seen["indices"]
    assert unpooled.shape == seen["pre_pool"].shape
    selected = torch.zeros_like(unpooled).flatten(2).scatter_(2, indices.flatten(2), 1.0).view_as(unpooled)
    assert (unpooled[selected == 0] == 0).all(), "unpooled values outside the max-pool's selected positions"
    # every decoded value sits exactly where its window's maximum was
    assert torch.equal(unpooled.flatten(2).gather(2, indices.flatten(2)), seen["decoded"].flatten(2))
    assert int(selected.sum()) == unpooled.numel() // 2**dims  # one position per pooling window
    assert len(torch.unique(indices % 2)) == 2  # the positions vary: not a fixed corner of each window


# --- FCN -------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", (2, 3))
def test_fcn_upsampling_is_bilinear(dims: int) -> None:
    model = make("fcn8s", dims, out_channels=3)
    layers = {"upscore2": model.upscore2, "upscore_pool4": model.upscore_pool4, "upscore": model.upscore}
    assert isinstance(model.upscore, BilinearUpsample) and not list(model.upscore.parameters())
    for name, layer in layers.items():
        factor = layer.factor if isinstance(layer, BilinearUpsample) else layer.stride[0]
        x = torch.full((1, 3, *[4] * dims), 2.5)
        x[:, 1] = -1.0  # classes stay separate
        with torch.no_grad():
            y = layer(x)
        assert y.shape[2:] == tuple(4 * factor for _ in range(dims)), name
        interior = (slice(None), slice(None), *[slice(factor, -factor)] * dims)
        expected = torch.tensor([2.5, -1.0, 2.5]).view(1, 3, *[1] * dims).expand_as(y)
        assert torch.allclose(y[interior], expected[interior], atol=1e-5), name
    kernel = bilinear_kernel(2, dims)
    assert kernel.shape == (4,) * dims and kernel.sum() == pytest.approx(2**dims)
    assert torch.equal(model.upscore2.weight[0, 0], kernel) and not model.upscore2.weight[0, 1].any()


def test_fcn_upsampling_interpolates_linearly() -> None:
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    with torch.no_grad():
        y = BilinearUpsample(2, 1, 4)(ramp)[0, 0, 16]
    # align_corners=False: sample i sits at 4*i + 1.5, so a ramp stays a ramp of slope 1/4
    assert torch.allclose(y[4:28], (torch.arange(4, 28) - 1.5) / 4)


def test_fcn8s_skips_add_detail_to_fcn32s() -> None:
    fcn32 = make("fcn32s", 2, out_channels=3, seed=0).eval()
    fcn8 = make("fcn8s", 2, out_channels=3, seed=1).eval()
    shared = fcn32.state_dict()
    missing, unexpected = fcn8.load_state_dict(shared, strict=False)
    assert not unexpected and set(missing) == {
        "upscore2.weight",
        "upscore_pool4.weight",
        "score_pool4.weight",
        "score_pool4.bias",
        "score_pool3.weight",
        "score_pool3.bias",
    }
    assert not fcn8.score_pool3.weight.any() and not fcn8.score_pool4.weight.any()  # zero start, as in the paper
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        coarse = fcn32(x)
        no_skip = fcn8(x)
        for layer in (fcn8.score_pool3, fcn8.score_pool4):
            nn.init.normal_(layer.weight, std=0.5)
        fine = fcn8(x)
    assert fine.shape == coarse.shape == (1, 3, 128, 128)
    assert not torch.allclose(fine, coarse, atol=1e-3)
    assert (fine - no_skip).abs().mean() > 0.1 * no_skip.abs().mean()
    # FCN-32s is piecewise linear between samples 32 px apart; what the pool3/pool4 skips
    # add bends every 8 or 16 px: finer detail, seen as many more kinks along a row.
    assert kink_fraction(fine - no_skip) > 3 * kink_fraction(coarse)


def kink_fraction(y: torch.Tensor) -> float:
    """Share of interior pixels where the map bends along the last axis (non-zero 2nd difference)."""
    bend = (y[..., 2:] - 2 * y[..., 1:-1] + y[..., :-2]).abs()[..., 16:-16, 16:-16]
    return (bend > 1e-4 * y.abs().max()).float().mean().item()


# --- U-Net -----------------------------------------------------------------------------


def test_unet_valid_tile_helpers() -> None:
    assert unet_valid_output_size(572, depth=4) == 388
    assert unet_valid_input_size(388, depth=4) == 572
    assert unet_valid_input_size(380, depth=4) == 572  # rounds up to the next size that fits
    assert unet_valid_output_size(60, depth=2) == 20
    for depth in (1, 2, 3, 4):
        for out in range(1, 100):
            inp = unet_valid_input_size(out, depth)
            assert unet_valid_output_size(inp, depth) >= out
            assert inp == 2**depth * ((inp + 4) // 2**depth) - 4
    with pytest.raises(InputSizeError, match="556 or 572"):
        unet_valid_output_size(570, depth=4)
    with pytest.raises(InputSizeError, match="at least 44"):
        unet_valid_output_size(40, depth=2)


@pytest.mark.parametrize(
    ("dims", "depth", "spatial", "features"),
    [
        (2, 4, (572, 572), 2),  # the paper's tile
        (2, 2, (60, 44), 4),
        (3, 2, (44, 48, 52), 2),
    ],
    ids=["2d-572", "2d-small", "3d-small"],
)
def test_unet_valid_mode_gives_stated_output(dims: int, depth: int, spatial: tuple[int, ...], features: int) -> None:
    torch.manual_seed(0)
    model = UNet(dims, 1, 2, features=features, depth=depth, padding="valid").eval()
    expected = tuple(unet_valid_output_size(s, depth) for s in spatial)
    assert model.output_shape(spatial) == expected
    with torch.no_grad():
        y = model(torch.randn(1, 1, *spatial))
    assert y.shape == (1, 2, *expected)


def test_unet_valid_mode_bad_size_names_nearest_valid() -> None:
    model = UNet(2, 1, 2, features=2, depth=2, padding="valid")
    with pytest.raises(InputSizeError, match="56 or 60"):
        model(torch.randn(1, 1, 60, 58))


def test_unet_depth_sets_divisor_and_levels() -> None:
    model = UNet(3, 1, 2, features=4, depth=3)
    assert model.size_divisor == 8 and len(model.encoder) == 4 and len(model.decoder) == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 8, 16, 24)).shape == (1, 2, 8, 16, 24)


# --- summary ---------------------------------------------------------------------------


def test_summary_counts_macs_and_receptive_field_exactly() -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 1, 2, 2))
    info = model_summary(net, (16, 20), in_channels=2)
    convs = 16 * 20 * (3 * 2 * 9 + 4 * 3 * 9)
    assert info["macs"] == convs + 16 * 20 * 4 * 1 * 4
    assert info["flops"] == 2 * info["macs"]
    assert info["parameters"] == info["trainable_parameters"] == sum(p.numel() for p in net.parameters())
    assert info["output_shape"] == (1, 1, 32, 40)
    # central output voxel of a 2x up-conv sees one input voxel, through two 3x3 convs: 5x5
    assert info["receptive_field"] == (5, 5) and not info["receptive_field_clipped"]


@pytest.mark.parametrize("name", ("unet", "segnet", "fcn8s"))
def test_summary_of_registered_models(name: str) -> None:
    model = make(name, 2).train()
    info = model_summary(model, (64, 64))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["output_shape"] == (1, 2, 64, 64)
    assert info["macs"] > 0 and info["flops"] == 2 * info["macs"]
    assert all(1 < r <= 64 for r in info["receptive_field"])


def test_a_model_built_on_the_meta_device_draws_no_weights():
    """The config check builds each model on the meta device for its shapes; drawing weights there would
    import torch._dynamo (about a second of start-up) for values that do not exist."""
    import subprocess
    import sys

    code = (
        "import sys, torch\nfrom medseg.models import build_model\n"
        "with torch.device('meta'):\n"
        "    build_model({'name': 'unet', 'spatial_dims': 3, 'in_channels': 1, 'out_channels': 2})\n"
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
