"""Elastic deformation after the U-Net paper, batched in torch on the model's device.

Ronneberger et al. (2015) draw random displacement vectors on a coarse 3x3 grid from a
Gaussian with 10 px standard deviation and upsample them to a per-pixel field with
bicubic interpolation. Here that field is added to a random affine map (shift, rotation,
flip, scale) in one sampling grid, so each tensor of a batch is resampled by a single
``grid_sample`` call: no per-sample Python loop, no float64 round trip and no
oversized control grid, which is why this is an order of magnitude faster than MONAI's
``Rand2DElasticd`` on a CPU (see ``bench/augment.py``) and runs on a GPU unchanged.

The upsampling is a separable cubic convolution (Keys, a = -0.75, the kernel torch's
``bicubic`` uses) written as one small matrix per axis, so 2D gets exactly torch's
bicubic and 3D gets true tricubic rather than a trilinear stand-in. With
``align_corners=True`` the control points sit on the first pixel, the last pixel and
evenly between, and the field there equals the drawn values.

Random numbers come from a ``torch.Generator`` on its own device (the CPU one by
default) and only the few parameters per sample are drawn, so a seed gives the same
augmentation whatever device the images are on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from medseg.config import AugmentConfig

__all__ = [
    "ElasticAugment",
    "control_displacements",
    "cubic_upsample_matrix",
    "upsample_displacement",
    "elastic_displacement",
]

_KEYS_A = -0.75  # torch's bicubic kernel; -0.5 would be Catmull-Rom


def cubic_upsample_matrix(
    size: int,
    grid_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(size, grid_size) weights that upsample ``grid_size`` control values to ``size`` pixels.

    A matrix rather than ``F.interpolate`` because torch has no 1D or 3D cubic mode;
    per axis, the same weights serve 2D and 3D. Border taps are clamped like torch's.
    """
    if size < 1 or grid_size < 1:
        raise ValueError(f"size and grid_size must be >= 1, got {size} and {grid_size}")
    # i * (g - 1) / (size - 1) in float64, integer product first: exact at control points.
    pos = torch.arange(size, dtype=torch.float64) * (grid_size - 1) / max(size - 1, 1)
    base = pos.floor()
    t = pos - base
    a = _KEYS_A
    s = t + 1.0
    u = 1.0 - t
    w_prev = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    w_here = ((a + 2) * t - (a + 3)) * t * t + 1
    w_next = ((a + 2) * u - (a + 3)) * u * u + 1
    w_far = 1.0 - w_prev - w_here - w_next
    weights = torch.stack([w_prev, w_here, w_next, w_far], dim=1)
    taps = (base.long().unsqueeze(1) + torch.arange(-1, 3)).clamp(0, grid_size - 1)
    matrix = torch.zeros(size, grid_size, dtype=torch.float64)
    matrix.scatter_add_(1, taps, weights)
    return matrix.to(device=device, dtype=dtype)


def control_displacements(
    batch: int,
    spatial_dims: int,
    grid_size: int = 3,
    sigma: float = 10.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(batch, spatial_dims, g, ..., g) control-point displacements ~ N(0, sigma^2), in pixels.

    Drawn on the generator's device so a seed means the same field on CPU and GPU.
    Component k moves along tensor axis k (for 2D: rows, then columns).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    shape = (batch, spatial_dims) + (grid_size,) * spatial_dims
    return torch.randn(shape, generator=generator, device=gen_device) * sigma


def upsample_displacement(coarse: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Cubic upsampling of (B, n, g, ..., g) control values to (B, n, *spatial_shape)."""
    field = _upsample_channels_last(torch.movedim(coarse, 1, -1), spatial_shape)
    return torch.movedim(field, -1, 1).contiguous()


def _upsample_channels_last(
    coarse: Tensor, spatial_shape: Sequence[int], linear: Tensor | None = None, offset: Tensor | None = None
) -> Tensor:
    """(B, g, ..., g, c) -> (B, *spatial_shape, c), one matrix product per axis, last axis first.

    Each product leaves the result contiguous in ``grid_sample``'s channels-last layout.
    An affine part, ``offset[b, c] + sum_d linear[b, d, c] * x_d`` with x_d running from
    -1 to 1 along tensor axis d, rides along as extra columns of the same products
    (the coordinate, and a column of ones for the offset), so it costs no pass of its own.
    It is exact: it bypasses the cubic weights, which do not reproduce straight lines.
    """
    n = len(spatial_shape)
    batch, channels = coarse.shape[0], coarse.shape[-1]
    coarse_shape = list(coarse.shape[1:-1])
    field = coarse
    for d in reversed(range(n)):
        matrix = cubic_upsample_matrix(spatial_shape[d], coarse_shape[d], field.device, field.dtype)
        before, after = math.prod(coarse_shape[:d]), math.prod(spatial_shape[d + 1 :])
        values = field.reshape(batch * before, coarse_shape[d], after * channels)
        if linear is not None:
            coords = torch.linspace(-1.0, 1.0, spatial_shape[d], device=field.device, dtype=field.dtype)
            columns, rows = [matrix, coords.unsqueeze(1)], [linear[:, d]]
            if d == 0 and offset is not None:
                columns.append(torch.ones_like(coords).unsqueeze(1))
                rows.append(offset)
            # Constant along the other axes: repeated over the coarse ones, broadcast over the rest.
            rows = [r.view(batch, 1, 1, channels).expand(batch, before, after, channels) for r in rows]
            matrix = torch.cat(columns, dim=1)
            values = torch.cat([values] + [r.reshape(batch * before, 1, after * channels) for r in rows], dim=1)
        field = (matrix @ values).view(batch, *coarse_shape[:d], *spatial_shape[d:], channels)
    return field


def elastic_displacement(
    batch: int,
    spatial_shape: Sequence[int],
    grid_size: int = 3,
    sigma: float = 10.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(batch, n, *spatial_shape) per-pixel displacements in pixels, one field per sample.

    The U-Net paper's law: control values ~ N(0, sigma^2) per axis, cubic in between.
    """
    coarse = control_displacements(batch, len(spatial_shape), grid_size, sigma, generator)
    return upsample_displacement(coarse.to(device), spatial_shape)


def _rotation(angles: Tensor, spatial_dims: int) -> Tensor:
    """(B, n, n) rotations from (B, 1) angles in 2D or (B, 3) Euler angles in 3D."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    if spatial_dims == 2:
        c, s = cos[:, 0], sin[:, 0]
        return torch.stack([c, -s, s, c], dim=1).view(-1, 2, 2)
    mats = []
    for axis in range(3):
        c, s = cos[:, axis], sin[:, axis]
        if axis == 0:
            rows = [one, zero, zero, zero, c, -s, zero, s, c]
        elif axis == 1:
            rows = [c, zero, s, zero, one, zero, -s, zero, c]
        else:
            rows = [c, -s, zero, s, c, zero, zero, zero, one]
        mats.append(torch.stack(rows, dim=1).view(-1, 3, 3))
    return mats[0] @ mats[1] @ mats[2]


def _grid_sample(image: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``F.grid_sample`` with align_corners=True, splitting a lone CPU sample across threads.

    torch's CPU kernel parallelises over the batch only, so a batch of one would use one
    core; cutting the grid into row blocks against the same (expanded, not copied) image
    halves the time on two cores.
    """
    batch, channels, rows = image.shape[0], image.shape[1], grid.shape[1]
    threads = torch.get_num_threads() if image.device.type == "cpu" else 1
    parts = max(k for k in range(1, min(threads, rows) + 1) if rows % k == 0) if batch == 1 else 1
    if parts == 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    blocks = grid.reshape(parts, rows // parts, *grid.shape[2:])
    out = F.grid_sample(
        image.expand(parts, *image.shape[1:]), blocks, mode=mode, padding_mode=padding_mode, align_corners=True
    )
    return out.transpose(0, 1).reshape(1, channels, *grid.shape[1:-1])


class ElasticAugment:
    """Random elastic deformation plus shift, rotation, flip, scale and grey values.

    Every component is drawn independently per sample: it happens with its own
    probability ``p_*`` and a magnitude of 0 switches it off. Geometry is one sampling
    grid per batch (sampling point = affine map of the output pixel + elastic
    displacement), applied with one ``grid_sample`` per tensor: images with
    ``image_mode``, labels with nearest so they keep exactly their class values.
    Grey-value changes touch the image only.

    Args (the settings are the fields of the config's ``augment:`` section,
    `medseg.config.AugmentConfig`: its defaults and ranges are the only ones, so a
    library user and ``medseg train`` get the same recipe):
        spatial_dims: 2 for (B, C, H, W) batches, 3 for (B, C, D, H, W).
        grid_size: control points per axis (the paper: 3).
        sigma: standard deviation of the control displacements, in input pixels (paper: 10).
        p_elastic: probability that a sample is elastically deformed.
        rotate_degrees: rotations are uniform in [-rotate_degrees, rotate_degrees]
            (in 3D, about each axis).
        p_rotate: probability of a rotation.
        shift: shifts are uniform in [-shift, shift] times each axis's extent, so one
            setting serves any tile size.
        p_shift: probability of a shift.
        scale: (low, high) zoom factor range; > 1 magnifies the content.
        p_scale: probability of a zoom.
        p_flip: probability of a mirror flip, independently per spatial axis.
        flip_axes: the spatial axes (0 = the first after the channel axis) that may be
            mirrored; None: every one. Restricts mirroring to the axes along which image and
            labels are mirror-symmetric.
        brightness: added offset, uniform in [-brightness, brightness] times the sample's
            grey-value range.
        contrast: contrast factor around the sample mean, uniform in [1 - c, 1 + c].
        gamma: gamma exponent exp(u), u uniform in [-gamma, gamma], on the sample's range.
        p_intensity: probability of each of the three grey-value changes.
        image_mode: "bilinear", or "bicubic" (2D only: torch has no 3D bicubic sampling).
        padding_mode: how points outside the image are filled ("reflection" mirrors
            tissue in, so no empty corners appear; "zeros" or "border" also work).

    Example::

        augment = ElasticAugment(spatial_dims=2, rotate_degrees=15, p_rotate=0.5)
        image, label = augment(image, label, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, spatial_dims: int, **settings: Any) -> None:
        try:
            cfg = AugmentConfig(**settings)  # the one source of defaults and ranges (the config's `augment:`)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc'])) or 'augment'}: {first['msg']}") from None
        self.settings = cfg
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if cfg.image_mode == "bicubic" and spatial_dims == 3:
            raise ValueError("image_mode='bicubic' needs spatial_dims=2: torch samples 3D only bilinear")
        axes = cfg.flip_axes
        if axes is not None and (len(set(axes)) != len(axes) or any(not 0 <= a < spatial_dims for a in axes)):
            raise ValueError(f"flip_axes must be distinct spatial axes in 0..{spatial_dims - 1}, got {list(axes)}")
        self.spatial_dims = spatial_dims
        self.grid_size = cfg.grid_size
        self.sigma = cfg.sigma
        self.p_elastic = cfg.p_elastic
        self.rotate_degrees = cfg.rotate_degrees
        self.p_rotate = cfg.p_rotate
        self.shift = cfg.shift
        self.p_shift = cfg.p_shift
        self.scale = (float(cfg.scale[0]), float(cfg.scale[1]))
        self.p_scale = cfg.p_scale
        self.p_flip = cfg.p_flip
        self.flip_axes = tuple(range(spatial_dims)) if axes is None else tuple(int(a) for a in axes)
        self.brightness = cfg.brightness
        self.contrast = cfg.contrast
        self.gamma = cfg.gamma
        self.p_intensity = cfg.p_intensity
        self.image_mode = cfg.image_mode
        self.padding_mode = cfg.padding_mode

    def __call__(
        self,
        image: Tensor,
        label: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Augment a batch; every sample gets its own random draw. Inputs are not modified."""
        n = self.spatial_dims
        if image.ndim != n + 2:
            raise ValueError(f"image must be (B, C, {'D, ' if n == 3 else ''}H, W), got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"image must be a floating-point tensor, got {image.dtype}")
        spatial = tuple(image.shape[2:])
        squeeze = False
        if label is not None:
            if label.ndim == n + 1:
                label, squeeze = label.unsqueeze(1), True
            if label.shape[0] != image.shape[0] or tuple(label.shape[2:]) != spatial:
                raise ValueError(f"label shape {tuple(label.shape)} does not match image shape {tuple(image.shape)}")

        # At least float32: a half-precision grid would be off by a fraction of a pixel on 512 px.
        work = torch.promote_types(image.dtype, torch.float32)
        grid = self.sampling_grid(image.shape[0], spatial, generator, image.device, work)
        out = _grid_sample(image.to(work), grid, self.image_mode, self.padding_mode)
        out = self._grey_values(out, generator).to(image.dtype)
        if label is None:
            return out, None
        sampled = _grid_sample(label.to(work), grid, "nearest", self.padding_mode)
        sampled = sampled.to(label.dtype) if label.is_floating_point() else sampled.round().to(label.dtype)
        return out, sampled.squeeze(1) if squeeze else sampled

    def sampling_grid(
        self,
        batch: int,
        spatial_shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The (B, *spatial, n) ``grid_sample`` grid (align_corners=True) of one random draw."""
        n = self.spatial_dims
        theta = self._affine(batch, spatial_shape, generator)
        if self.sigma > 0 and self.p_elastic > 0:
            coarse = control_displacements(batch, n, self.grid_size, self.sigma, generator).cpu()
            coarse = coarse * self._gate(batch, self.p_elastic, generator).view(-1, *([1] * (n + 1)))
            # Pixels along tensor axes -> grid units along (x, y[, z]), on the coarse grid (cheap).
            coarse = coarse.flip(1) / self._half_extent(spatial_shape).view(1, n, *([1] * n))
        else:
            coarse = torch.zeros(batch, n, *([1] * n))  # a single control point: no displacement
        coarse = torch.movedim(coarse, 1, -1).to(device=device, dtype=dtype)
        # theta's columns are x, y[, z]: tensor axis d is grid coordinate n - 1 - d.
        linear = theta[:, :, :n].flip(2).transpose(1, 2).to(device=device, dtype=dtype)
        offset = theta[:, :, n].to(device=device, dtype=dtype)
        return _upsample_channels_last(coarse, spatial_shape, linear, offset)

    def _gate(self, batch: int, p: float, generator: torch.Generator | None, count: int = 1) -> Tensor:
        """(batch, count) of 1.0 where a component fires, 0.0 where it does not."""
        return (self._uniform((batch, count), generator) < p).float()

    @staticmethod
    def _uniform(
        shape: tuple[int, ...], generator: torch.Generator | None, low: float = 0.0, high: float = 1.0
    ) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(shape, generator=generator, device=gen_device).cpu() * (high - low) + low

    def _half_extent(self, spatial_shape: Sequence[int]) -> Tensor:
        """Half the pixel-centre span per axis in (x, y[, z]) order: one grid unit in pixels."""
        return torch.tensor([max(s - 1, 1) / 2 for s in reversed(spatial_shape)], dtype=torch.float32)

    def _affine(self, batch: int, spatial_shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
        """(B, n, n+1) ``affine_grid`` theta; built in pixels so rotations stay rigid on non-square images."""
        n = self.spatial_dims
        matrix = torch.eye(n).expand(batch, n, n)
        offset = torch.zeros(batch, n)
        if self.p_flip > 0:
            flips = self._gate(batch, self.p_flip, generator, count=n)
            # Columns are (x, y[, z]): tensor axis a is column n - 1 - a. Every axis is drawn
            # either way, so limiting the axes leaves the other random draws unchanged.
            allowed = torch.zeros(n)
            allowed[[n - 1 - a for a in self.flip_axes]] = 1.0
            flips = flips * allowed
            matrix = matrix * (1 - 2 * flips).unsqueeze(1)
        if self.scale != (1.0, 1.0):
            zoom = self._uniform((batch,), generator, *self.scale)
            zoom = torch.where(self._gate(batch, self.p_scale, generator)[:, 0] > 0, zoom, torch.ones_like(zoom))
            matrix = matrix / zoom.view(-1, 1, 1)
        if self.rotate_degrees > 0:
            count = 1 if n == 2 else 3
            limit = math.radians(self.rotate_degrees)
            angles = self._uniform((batch, count), generator, -limit, limit)
            angles = angles * self._gate(batch, self.p_rotate, generator)
            matrix = _rotation(angles, n) @ matrix
        half = self._half_extent(spatial_shape)
        if self.shift > 0:
            fraction = self._uniform((batch, n), generator, -self.shift, self.shift)
            offset = fraction * 2 * half * self._gate(batch, self.p_shift, generator)
        # Pixel-space map q = M p + t, conjugated into grid units by the half extents.
        theta = matrix * half.view(1, 1, n) / half.view(1, n, 1)
        return torch.cat([theta, (offset / half).unsqueeze(-1)], dim=-1)

    def _grey_values(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """Gamma, contrast and brightness relative to each sample's own range, so any units work.

        ``image`` is the freshly resampled batch, so it is changed in place; samples whose
        draw skips a change are not touched at all, which keeps them bit-exact.
        """
        if self.p_intensity == 0 or not (self.brightness or self.contrast or self.gamma):
            return image
        batch = image.shape[0]
        view = (batch,) + (1,) * (image.ndim - 1)
        gates = self._gate(batch, self.p_intensity, generator, count=3).bool()
        exponent = self._uniform((batch,), generator, -self.gamma, self.gamma).exp()
        factor = 1 + self._uniform((batch,), generator, -self.contrast, self.contrast)
        delta = self._uniform((batch,), generator, -self.brightness, self.brightness)
        gates &= torch.tensor([self.gamma > 0, self.contrast > 0, self.brightness > 0])
        if not gates.any():
            return image
        low, high = torch.aminmax(image.reshape(batch, -1), dim=1)
        span = (high - low).clamp_min(torch.finfo(image.dtype).tiny)
        gamma_idx = gates[:, 0].nonzero().squeeze(1).to(image.device)
        if gamma_idx.numel():
            lo, sp = low[gamma_idx].view(-1, *view[1:]), span[gamma_idx].view(-1, *view[1:])
            part = image[gamma_idx].sub_(lo).div_(sp).clamp_(0, 1)
            part.pow_(exponent[gates[:, 0]].to(image).view(-1, *view[1:])).mul_(sp).add_(lo)
            image[gamma_idx] = part
        if gates[:, 1:].any():
            # contrast about the mean, then brightness: one multiply-add per pixel
            factor = torch.where(gates[:, 1], factor, torch.ones_like(factor)).to(image)
            mean = image.reshape(batch, -1).mean(dim=1) if gates[:, 1].any() else torch.zeros_like(span)
            shift = (1 - factor) * mean + (delta.to(image) * gates[:, 2].to(image)) * span
            image = torch.addcmul(shift.view(view), image, factor.view(view))  # x * 1 + 0 stays x
        return image
