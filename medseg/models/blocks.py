"""Pieces every medseg model shares: conv blocks, He initialisation, input-shape checks.

Kept in one place so that U-Net, SegNet and FCN fail the same way on a bad input
and start from the same initialisation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from medseg.errors import MedsegError

__all__ = [
    "InputSizeError",
    "center_crop",
    "check_input",
    "check_spatial_dims",
    "conv_block",
    "he_init",
    "nearest_multiples",
    "NORMS",
]

# What may follow a convolution in a conv_block (None: nothing).
NORMS = ("batch", "instance", None)


class InputSizeError(MedsegError, ValueError):
    """An input tensor has a shape the model cannot take.

    The message names the sizes the model can take, so the caller can pad or crop;
    it is also a ``ValueError`` for code that does not know medseg's errors.
    """


def check_spatial_dims(spatial_dims: int) -> None:
    """Reject anything but 2D or 3D early, at construction, rather than in a factory lookup."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def conv_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    padding: int | None = None,
    norm: str | None = "batch",
    relu: bool = True,
) -> nn.Sequential:
    """Convolution, optional normalisation, optional ReLU.

    ``padding`` defaults to 'same' (``kernel_size // 2``; kernels are odd). ``norm`` is one of
    :data:`NORMS`: 'batch' (statistics over the batch, running averages at inference),
    'instance' (statistics per sample and channel, with a learned scale and shift: what
    nnU-Net uses, since it does not depend on the batch size) or None. The convolution has
    no bias when a norm follows it: the norm's shift makes a bias redundant.

    Example:
        >>> conv_block(3, 8, 16)  # Conv3d(8, 16, 3, padding=1) + BatchNorm3d + ReLU
        >>> conv_block(3, 8, 16, norm="instance")  # ... + InstanceNorm3d(affine=True) + ReLU
    """
    if padding is None:
        padding = kernel_size // 2
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(str, NORMS))}, got {norm!r}")
    layers: list[nn.Module] = [
        Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=norm is None
        )
    ]
    if norm == "batch":
        layers.append(Norm[Norm.BATCH, spatial_dims](out_channels))
    elif norm == "instance":
        layers.append(Norm[Norm.INSTANCE, spatial_dims](out_channels, affine=True))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def he_init(module: nn.Module, skip: Sequence[nn.Module] = ()) -> None:
    """He (Kaiming) normal initialisation of every convolution in ``module``, biases zero.

    Plain convolutions use ``fan_in`` as in He et al. and the U-Net paper (std sqrt(2/N),
    N the inputs of one unit). For a transposed convolution torch's fan_in would count
    *output* channels, so its std is computed from the inputs that actually reach one
    output voxel (in_channels x kernel volume / stride volume). Modules in ``skip`` (and
    everything inside them) keep their own initialisation, e.g. FCN's bilinear kernels.
    On the meta device nothing is drawn: drawing there imports torch._dynamo (a second of
    `medseg predict` start-up, measured by bench/cli_startup.py) for values that do not exist.
    """
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if id(m) in skipped or getattr(getattr(m, "weight", None), "is_meta", False):
            continue  # a meta tensor (a config check builds the model for its shapes) has no values to draw
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            fan = m.in_channels // m.groups * math.prod(m.kernel_size) / math.prod(m.stride)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
        elif isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def nearest_multiples(size: int, multiple: int) -> tuple[int, int]:
    """The multiples of ``multiple`` just below and just above ``size`` (the lower one at least ``multiple``)."""
    lower = max(multiple, size // multiple * multiple)
    upper = lower if lower >= size else lower + multiple
    return lower, upper


def check_input(
    x: torch.Tensor,
    model_name: str,
    spatial_dims: int,
    in_channels: int,
    size_divisor: int,
) -> None:
    """Raise :class:`InputSizeError` unless ``x`` is (batch, in_channels, *spatial) with sizes divisible.

    Checked before the first layer so the user sees which axis is wrong and what to pad
    to, not a shape mismatch from a ``torch.cat`` deep inside the decoder.
    """
    if x.ndim != spatial_dims + 2:
        raise InputSizeError(
            f"{model_name} is a {spatial_dims}D model and takes a (batch, channels, "
            f"{', '.join('xyz'[:spatial_dims])}) tensor; got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise InputSizeError(
            f"{model_name} was built for {in_channels} input channel(s); got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    spatial = tuple(int(s) for s in x.shape[2:])
    bad = [(axis, s) for axis, s in enumerate(spatial) if s % size_divisor or s == 0]
    if bad:
        detail = "; ".join(
            f"axis {axis} has size {s} "
            f"(nearest valid: {' or '.join(map(str, sorted(set(nearest_multiples(s, size_divisor)))))})"
            for axis, s in bad
        )
        raise InputSizeError(
            f"{model_name} needs every spatial size to be a multiple of {size_divisor}; "
            f"got spatial shape {spatial}: {detail}. Pad the input to a multiple of {size_divisor}."
        )


def center_crop(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``x`` to ``spatial_shape`` around the centre."""
    slices: list[slice] = [slice(None), slice(None)]
    for size, target in zip(x.shape[2:], spatial_shape):
        start = (size - target) // 2
        slices.append(slice(start, start + target))
    return x[tuple(slices)]
