"""Elastic augmentation: the U-Net paper's law, exact identities, labels, batching, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
import torch.nn.functional as F

from medseg.config import AugmentConfig
from medseg.data.augment import (
    ElasticAugment,
    _grid_sample,
    control_displacements,
    cubic_upsample_matrix,
    elastic_displacement,
    upsample_displacement,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Sizes where (size - 1) is a multiple of (grid_size - 1), so control points are pixels.
SHAPES = {2: (33, 65), 3: (17, 9, 33)}
ALL_OFF = dict(sigma=0.0, p_flip=0.0)
# Everything but elastic deformation and flips off: what these tests take apart one piece at a time.
NEUTRAL = dict(p_elastic=1.0, rotate_degrees=0.0, shift=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, gamma=0.0)


def _augment(spatial_dims: int, **settings: object) -> ElasticAugment:
    return ElasticAugment(spatial_dims, **{**NEUTRAL, **settings})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(spatial_dims: int, batch: int = 2, channels: int = 1, device: str = "cpu") -> torch.Tensor:
    """Smooth but asymmetric along every axis, so flips and shifts show."""
    shape = SHAPES[spatial_dims]
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    base = sum((k + 1) * a**2 for k, a in enumerate(axes)) + torch.sin(5 * axes[-1])
    return (base + torch.rand(batch, channels, *shape, generator=_gen(9))).to(device)


def _labels(spatial_dims: int, batch: int = 2, dtype: torch.dtype = torch.long) -> torch.Tensor:
    values = torch.tensor([0, 3, 7])
    index = torch.randint(0, 3, (batch, 1, *SHAPES[spatial_dims]), generator=_gen(5))
    return values[index].to(dtype)


def _control_indices(size: int, grid_size: int) -> list[int]:
    return [k * (size - 1) // (grid_size - 1) for k in range(grid_size)]


def test_cubic_matrix_is_torch_bicubic_with_aligned_corners():
    coarse = torch.randn(3, 2, 3, 4, generator=_gen())
    ours = upsample_displacement(coarse, (50, 77))
    torch_bicubic = F.interpolate(coarse, size=(50, 77), mode="bicubic", align_corners=True)
    assert torch.allclose(ours, torch_bicubic, atol=1e-5)
    assert torch.allclose(cubic_upsample_matrix(101, 3).sum(dim=1), torch.ones(101))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_field_at_control_points_equals_drawn_values(spatial_dims):
    shape = SHAPES[spatial_dims]
    drawn = control_displacements(4, spatial_dims, 3, 10.0, _gen(1))
    field = elastic_displacement(4, shape, 3, 10.0, _gen(1))
    assert field.shape == (4, spatial_dims, *shape)
    index = torch.meshgrid(*[torch.tensor(_control_indices(s, 3)) for s in shape], indexing="ij")
    at_controls = field[(slice(None), slice(None), *index)]
    assert torch.equal(at_controls, drawn)


@pytest.mark.parametrize("grid_size, sigma", [(3, 10.0), (5, 4.0)])
def test_control_point_std_is_sigma(grid_size, sigma):
    field = elastic_displacement(2000, (9, 9), grid_size, sigma, _gen(2))
    index = _control_indices(9, grid_size)
    values = field[:, :, index][:, :, :, index]
    assert values.numel() >= 36_000
    assert values.std().item() == pytest.approx(sigma, rel=0.03)
    assert abs(values.mean().item()) < 0.03 * sigma
    between = field[:, :, 1:4, 1:4]  # the law is at the control points; in between it is smoother
    assert between.std().item() < values.std().item()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_class_uses_the_same_law_as_the_pure_function(spatial_dims):
    shape = SHAPES[spatial_dims]
    augment = _augment(spatial_dims, sigma=7.0, p_flip=0.0)
    grid = augment.sampling_grid(3, shape, _gen(3))
    identity = _augment(spatial_dims, **ALL_OFF).sampling_grid(3, shape)
    half = torch.tensor([(s - 1) / 2 for s in reversed(shape)])
    pixels = torch.movedim((grid - identity) * half, -1, 1).flip(1)
    assert torch.allclose(pixels, elastic_displacement(3, shape, 3, 7.0, _gen(3)), atol=1e-4)


@pytest.mark.parametrize("spatial_dims, mode", [(2, "bilinear"), (2, "bicubic"), (3, "bilinear")])
def test_identity_when_everything_is_off(spatial_dims, mode):
    image, label = _image(spatial_dims), _labels(spatial_dims)
    out, out_label = _augment(spatial_dims, image_mode=mode, **ALL_OFF)(image, label, _gen())
    assert torch.allclose(out, image, atol=1e-5)
    assert torch.equal(out_label, label)


def test_zero_rotation_is_identity():
    image = _image(2)
    augment = _augment(2, rotate_degrees=0.0, p_rotate=1.0, **ALL_OFF)
    assert torch.allclose(augment(image, None, _gen())[0], image, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_probability_one_is_torch_flip(spatial_dims):
    image, label = _image(spatial_dims), _labels(spatial_dims)
    out, out_label = _augment(spatial_dims, sigma=0.0, p_flip=1.0)(image, label, _gen())
    dims = tuple(range(2, 2 + spatial_dims))
    assert torch.allclose(out, torch.flip(image, dims), atol=1e-5)
    assert torch.equal(out_label, torch.flip(label, dims))
    assert not torch.allclose(out, image, atol=1e-2)


@pytest.mark.parametrize("spatial_dims,flip_axes", [(2, [1]), (2, [0]), (2, []), (3, [0]), (3, [1, 2])])
def test_flip_axes_mirror_only_the_named_axes(spatial_dims, flip_axes):
    image, label = _image(spatial_dims), _labels(spatial_dims)
    out, out_label = _augment(spatial_dims, sigma=0.0, p_flip=1.0, flip_axes=flip_axes)(image, label, _gen())
    dims = tuple(2 + a for a in flip_axes)
    expected, expected_label = (torch.flip(image, dims), torch.flip(label, dims)) if dims else (image, label)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out_label, expected_label)


def test_flip_axes_leave_the_other_random_draws_as_they_were():
    """Limiting the mirrored axes changes only the mirroring: the elastic field, rotation, zoom
    and shift of a seed stay the same, so the two grids differ by a linear map alone."""
    shape = (48, 40)
    settings = dict(sigma=5.0, rotate_degrees=20.0, p_rotate=1.0, shift=0.05, p_shift=1.0, p_flip=1.0)
    both = _augment(2, **settings).sampling_grid(8, shape, _gen(3))
    only_y = _augment(2, flip_axes=[1], **settings).sampling_grid(8, shape, _gen(3))
    difference = (both - only_y).reshape(8, -1, 2)
    rows, columns = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
    design = torch.stack([torch.ones(48 * 40), rows.reshape(-1), columns.reshape(-1)], dim=1)
    for sample in difference:
        fit = torch.linalg.lstsq(design, sample).solution
        assert (design @ fit - sample).abs().max() < 1e-4  # the elastic part cancelled exactly
        assert sample.abs().max() > 0.1  # and the mirroring did differ


def test_rotation_is_rigid_in_pixels_on_a_non_square_image():
    """A centred disc on a 41 x 81 image stays a disc: rotations are not done in grid units."""
    rows, cols = torch.meshgrid(torch.arange(41.0) - 20, torch.arange(81.0) - 40, indexing="ij")
    disc = (rows**2 + cols**2 <= 15**2).float().expand(4, 1, 41, 81)
    augment = _augment(2, sigma=0.0, rotate_degrees=45.0, p_rotate=1.0, padding_mode="zeros")
    out, out_label = augment(disc, disc, _gen(4))
    area = disc.sum(dim=(1, 2, 3))
    # Only rim pixels may change (about 4%); rotating in grid units instead gives 30-80%.
    assert ((out_label != disc).sum(dim=(1, 2, 3)) / area).max() < 0.08
    assert torch.allclose(out.sum(dim=(1, 2, 3)), area, rtol=0.02)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fused_affine_grid_matches_torch_affine_grid(spatial_dims):
    shape = SHAPES[spatial_dims]
    augment = _augment(
        spatial_dims,
        sigma=0.0,
        rotate_degrees=30,
        p_rotate=1.0,
        shift=0.1,
        p_shift=1.0,
        scale=(0.8, 1.2),
        p_scale=1.0,
        p_flip=0.5,
    )
    grid = augment.sampling_grid(5, shape, _gen(6))
    theta = augment._affine(5, shape, _gen(6))
    assert torch.allclose(grid, F.affine_grid(theta, [5, 1, *shape], align_corners=True), atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.uint8])
def test_labels_keep_only_their_original_values(spatial_dims, dtype):
    label = _labels(spatial_dims, batch=3, dtype=dtype)
    augment = _augment(
        spatial_dims,
        sigma=10.0,
        rotate_degrees=20,
        p_rotate=1.0,
        scale=(0.8, 1.2),
        p_scale=1.0,
        p_flip=0.5,
        brightness=0.2,
        contrast=0.2,
        gamma=0.3,
        p_intensity=1.0,
    )
    _, out = augment(_image(spatial_dims, batch=3), label, _gen(7))
    assert out.dtype == dtype and out.shape == label.shape
    assert set(out.unique().tolist()) <= {0, 3, 7}
    assert not torch.equal(out, label)


def test_grey_value_changes_leave_labels_untouched():
    image, label = _image(2, batch=4), _labels(2, batch=4)
    augment = _augment(2, brightness=0.3, contrast=0.3, gamma=0.5, p_intensity=1.0, **ALL_OFF)
    out, out_label = augment(image, label, _gen())
    assert torch.equal(out_label, label)
    assert not torch.allclose(out, image, atol=1e-3)
    # grey values only: the ordering of pixel values within a sample is kept (all maps are monotonic)
    order = image[0].flatten().argsort()
    assert (out[0].flatten()[order].diff() >= -1e-5).all()


def test_seeded_generator_is_deterministic_and_samples_differ():
    image, label = _image(2, batch=4), _labels(2, batch=4)
    augment = _augment(2, rotate_degrees=10, shift=0.05, p_flip=0.5, contrast=0.2)
    first = augment(image, label, _gen(11))
    second = augment(image, label, _gen(11))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(augment(image, label, _gen(12))[0], first[0])
    fields = elastic_displacement(4, SHAPES[2], generator=_gen(13))
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(fields[i], fields[j])
    # same input in every slot, different output per slot: each sample has its own field
    same = image[:1].expand(4, -1, -1, -1)
    out = _augment(2)(same, None, _gen(14))[0]
    assert not torch.allclose(out[0], out[1], atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims, channels", [(2, 1), (2, 3), (3, 1), (3, 2)])
def test_batched_shapes_dtype_and_device(spatial_dims, channels, device):
    image = _image(spatial_dims, batch=3, channels=channels, device=device)
    label = _labels(spatial_dims, batch=3).to(device)
    augment = _augment(
        spatial_dims,
        rotate_degrees=10,
        shift=0.1,
        scale=(0.9, 1.1),
        p_flip=0.5,
        brightness=0.1,
        contrast=0.1,
        gamma=0.1,
    )
    before = image.clone()
    out, out_label = augment(image, label, _gen())
    assert out.shape == image.shape and out.dtype == torch.float32 and out.device == image.device
    assert out_label.shape == label.shape and out_label.device == label.device
    assert torch.isfinite(out).all()
    assert torch.equal(image, before)  # inputs are never modified


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_single_sample_split_across_threads_matches_grid_sample(spatial_dims, mode):
    shape = (12, 20) if spatial_dims == 2 else (12, 10, 8)
    image = torch.rand(1, 2, *shape, generator=_gen())
    grid = _augment(spatial_dims, rotate_degrees=20, p_rotate=1.0).sampling_grid(1, shape, _gen())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 12 rows: three blocks of 4
        split = _grid_sample(image, grid, mode, "reflection")
    finally:
        torch.set_num_threads(threads)
    whole = F.grid_sample(image, grid, mode=mode, padding_mode="reflection", align_corners=True)
    assert torch.equal(split, whole)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_image_dtype_is_kept(dtype):
    image = _image(2).to(dtype)
    out, _ = _augment(2, rotate_degrees=10, contrast=0.2)(image, None, _gen())
    assert out.dtype == dtype and out.shape == image.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_augmentation_on_cpu_and_cuda():
    image, label = _image(2), _labels(2)
    augment = _augment(2, rotate_degrees=10, p_flip=0.5)
    cpu = augment(image, label, _gen(3))
    cuda = augment(image.cuda(), label.cuda(), _gen(3))
    assert torch.allclose(cuda[0].cpu(), cpu[0], atol=1e-4)


def test_label_without_channel_axis_and_probability_zero_elastic():
    image, label = _image(2), _labels(2)[:, 0]
    out, out_label = _augment(2, p_elastic=0.0, p_flip=0.0)(image, label, _gen())
    assert out_label.shape == label.shape and torch.equal(out_label, label)
    assert torch.allclose(out, image, atol=1e-5)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="bicubic"):
        _augment(3, image_mode="bicubic")
    with pytest.raises(ValueError, match="p_flip"):
        _augment(2, p_flip=1.5)
    with pytest.raises(ValueError, match="flip_axes"):
        _augment(2, flip_axes=[2])
    with pytest.raises(ValueError, match="flip_axes"):
        _augment(3, flip_axes=[1, 1])
    augment = _augment(2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="does not match"):
        augment(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(TypeError, match="floating-point"):
        augment(torch.zeros(1, 1, 8, 8, dtype=torch.long))


def test_rotation_degrees_are_radians_inside():
    augment = _augment(2, sigma=0.0, rotate_degrees=90.0, p_rotate=1.0, p_flip=0.0)
    theta = augment._affine(200, (11, 11), _gen())
    angles = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
    assert angles.abs().max() <= math.pi / 2 + 1e-6 and angles.abs().max() > math.pi / 2 * 0.95


def test_one_source_of_augmentation_defaults_and_ranges() -> None:
    """ElasticAugment takes its defaults and ranges from the config's augment section (they used to differ)."""
    assert ElasticAugment(2).settings == AugmentConfig()
    assert AugmentConfig().p_elastic == 0.9 and AugmentConfig().rotate_degrees == 15.0
    for bad in ({"p_elastic": 1.5}, {"rotate_degrees": 200}, {"grid_size": 1}, {"sigmaa": 1.0}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            ElasticAugment(2, **bad)
        with pytest.raises(ValidationError, match=key):
            AugmentConfig(**bad)
