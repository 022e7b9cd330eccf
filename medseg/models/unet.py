"""U-Net after Ronneberger, Fischer and Brox, MICCAI 2015 (arXiv:1505.04597), in 2D and 3D.

The decoder concatenates the encoder's features at each level, so fine detail lost to
pooling comes back for precise boundaries. The paper's convolutions are unpadded
('valid'): an output tile is smaller than its input tile and the network is applied
with the overlap-tile strategy; ``unet_valid_output_size`` / ``unet_valid_input_size``
give the tile sizes that fit. 'same' padding (the default) keeps the output the
input's size, which is what sliding-window inference expects.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from torch import nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import InputSizeError, center_crop, conv_block, he_init
from medseg.models.registry import register_model

__all__ = ["UNet", "unet_valid_input_size", "unet_valid_output_size"]

PADDINGS = ("same", "valid")
UNET_NORMS = ("batch", "instance", "none")


@register_model("unet")
class UNet(SegmentationModel):
    """U-Net: a contracting path, a symmetric expanding path, concatenation skips.

    Each level has two 3x3 convolutions (optional batch norm, ReLU); 2x2 max-pooling
    halves the size and the width doubles; a 2x2 up-convolution halves the width on the
    way up, the encoder's features of that level are concatenated (centre-cropped in
    'valid' mode, as in the paper) and two 3x3 convolutions follow; a 1x1 convolution
    maps to class scores. Dropout sits at the end of the contracting path (the deepest
    encoder level and the bottleneck), as in the paper's released model.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (image modalities).
        out_channels: output channels (classes).
        features: width of the first level; level i has ``features * 2**i``
            (64 in the paper).
        depth: number of poolings (4 in the paper: 5 levels). Inputs must be multiples
            of ``2**depth`` in 'same' mode.
        batch_norm: batch norm after every 3x3 convolution. On by default (not in the
            2015 paper) because it makes training from scratch far less sensitive to the
            learning rate; set False for the paper's network (no normalisation).
        norm: the normalisation after every 3x3 convolution, when given: 'batch',
            'instance' (per sample and channel, with a learned scale and shift, as nnU-Net:
            it does not depend on the batch size, so a batch of 2 large 3D patches trains
            as well as a batch of 32) or 'none'. It takes precedence over ``batch_norm``,
            the older switch (true = 'batch', false = 'none'); setting ``batch_norm`` false
            together with a ``norm`` other than 'none' is a contradiction and refused.
        max_features: the widest any level may be (None: no cap). nnU-Net caps at 320 in
            3D and 512 in 2D: past that, width adds parameters faster than accuracy.
        dropout: dropout probability at the end of the contracting path; 0 disables it.
        padding: 'same' (output size = input size) or 'valid' (the paper's unpadded
            convolutions; see :func:`unet_valid_output_size`).

    Example:
        >>> net = UNet(spatial_dims=2, in_channels=1, out_channels=2, features=64, padding="valid")
        >>> net(torch.zeros(1, 1, 572, 572)).shape
        torch.Size([1, 2, 388, 388])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        dropout: float = 0.5,
        padding: str = "same",
        norm: str | None = None,
        max_features: int | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if features < 1:
            raise ValueError(f"features must be at least 1, got {features}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm is not None and norm not in UNET_NORMS:
            raise ValueError(f"norm must be one of {', '.join(UNET_NORMS)}, got {norm!r}")
        if norm not in (None, "none") and not batch_norm:
            raise ValueError(f"batch_norm false turns normalisation off but norm is {norm!r}; remove batch_norm")
        if max_features is not None and max_features < features:
            raise ValueError(f"max_features ({max_features}) must be at least features ({features})")
        self.depth = depth
        self.padding = padding
        self.size_divisor = 2**depth

        pad = 1 if padding == "same" else 0
        widths = [min(features * 2**level, max_features or features * 2**level) for level in range(depth + 1)]
        layer_norm = ("batch" if batch_norm else None) if norm is None else (None if norm == "none" else norm)

        def double_conv(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                conv_block(spatial_dims, c_in, c_out, 3, pad, layer_norm),
                conv_block(spatial_dims, c_out, c_out, 3, pad, layer_norm),
            )

        # encoder[depth] is the bottleneck.
        self.encoder = nn.ModuleList(
            double_conv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        self.dropout = Dropout[Dropout.DROPOUT, spatial_dims](dropout) if dropout > 0 else nn.Identity()
        # Decoder modules run deepest first.
        self.up = nn.ModuleList(
            Conv[Conv.CONVTRANS, spatial_dims](widths[level + 1], widths[level], kernel_size=2, stride=2)
            for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(double_conv(2 * widths[level], widths[level]) for level in reversed(range(depth)))
        self.head = Conv[Conv.CONV, spatial_dims](widths[0], out_channels, kernel_size=1)
        he_init(self)

    def output_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the output for an input of ``spatial_shape`` (raises if it cannot take it)."""
        if self.padding == "same":
            return tuple(spatial_shape)
        shape = tuple(int(s) for s in spatial_shape)
        out = []
        for axis, size in enumerate(shape):
            try:
                out.append(unet_valid_output_size(size, self.depth))
            except InputSizeError as exc:
                raise InputSizeError(f"input spatial shape {shape}, axis {axis}: {exc}") from None
        return tuple(out)

    @property
    def label(self) -> str:
        return f"UNet (depth {self.depth}{', valid' if self.padding == 'valid' else ''})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            self.check_input(x)
        else:
            self.check_input(x, size_divisor=1)
            self.output_shape(x.shape[2:])
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x)
            if level >= self.depth - 1:
                x = self.dropout(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = up(x)
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        return self.head(x)


def _trace_valid(size: int, depth: int) -> int | None:
    """Follow one axis through a valid-mode U-Net: the output size, or None if some layer cannot take it."""
    x = size
    for _ in range(depth):
        x -= 4  # two unpadded 3x3 convolutions
        if x < 2 or x % 2:
            return None  # a 2x2 pool needs an even size
        x //= 2
    x -= 4
    if x < 1:
        return None
    for _ in range(depth):
        x = 2 * x - 4
        if x < 1:
            return None
    return x


def _min_valid_input(depth: int) -> int:
    size = 2**depth - 4  # sizes that fit are 2**depth * k - 4
    while _trace_valid(size, depth) is None:
        size += 2**depth
    return size


def unet_valid_output_size(input_size: int, depth: int = 4) -> int:
    """Output size along one axis of a 'valid' (unpadded) U-Net for an input tile of ``input_size``.

    Valid sizes are ``2**depth * k - 4`` from a minimum up; the output is smaller by
    ``12 * 2**depth - 8`` (184 for the paper's depth 4: 572 -> 388).

    Raises:
        InputSizeError: the size does not fit; the message names the nearest sizes that do.

    Example:
        >>> unet_valid_output_size(572, depth=4)
        388
    """
    out = _trace_valid(input_size, depth)
    if out is not None:
        return out
    step, smallest = 2**depth, _min_valid_input(depth)
    above = max(smallest, -(-(input_size + 4) // step) * step - 4)
    below = (input_size + 4) // step * step - 4
    nearest = [s for s in (below, above) if s >= smallest]
    raise InputSizeError(
        f"UNet (depth {depth}, valid padding) cannot take size {input_size}: sizes must be "
        f"{step}*k - 4 and at least {smallest}; nearest valid: {' or '.join(map(str, sorted(set(nearest))))}"
    )


def unet_valid_input_size(output_size: int, depth: int = 4) -> int:
    """Smallest input tile of a 'valid' U-Net whose output tile is at least ``output_size``.

    The inverse of :func:`unet_valid_output_size` for sizes that fit exactly.

    Example:
        >>> unet_valid_input_size(388, depth=4)
        572
    """
    step = 2**depth
    size = max(_min_valid_input(depth), -(-(output_size + 12 * step - 8 + 4) // step) * step - 4)
    while (_trace_valid(size, depth) or 0) < output_size:
        size += step
    return size
