"""SegNet and SegNet-Basic after Badrinarayanan, Kendall and Cipolla, TPAMI 2017 (arXiv:1511.00561).

The decoder upsamples with the max-pooling indices the encoder remembered: each value
goes back to the position its pooling window selected, the rest stay zero, and the
following convolutions densify the sparse map. Nothing in the upsampling is learned
and the encoder's feature maps need not be kept, only their indices. MONAI has no
unpooling factory, so the unpool layer is chosen by ``spatial_dims`` here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import conv_block, he_init
from medseg.models.registry import register_model

__all__ = ["SegNet", "SegNetBasic"]

_UNPOOL: dict[int, type[nn.Module]] = {2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}

# VGG16's 13 convolutions: convolutions per stage and width relative to ``features``.
VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)
VGG16_STAGE_WIDTHS = (1, 2, 4, 8, 8)


class _IndexEncoderDecoder(SegmentationModel):
    """Encoder stages with index-keeping max-pools, mirrored decoder stages with max-unpooling.

    ``pools[i]`` belongs to encoder stage i (shallow first); ``unpools`` and ``decoder``
    run deepest first, so ``unpools[depth - 1 - i]`` reuses the indices of ``pools[i]``.
    Decoder stage i mirrors encoder stage i: the same number of convolutions, the last
    one narrowing to the width of the stage above. A 1x1 convolution gives class scores.
    """

    def __init__(
        self,
        label: str,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stage_convs: Sequence[int],
        stage_widths: Sequence[int],
        kernel_size: int,
        decoder_relu: bool,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that padding keeps the size, got {kernel_size}")
        self._label = label  # names the model in input-size errors
        self.depth = len(stage_convs)
        self.size_divisor = 2**self.depth

        def stage(widths: Sequence[int], relu: bool) -> nn.Sequential:
            return nn.Sequential(
                *(conv_block(spatial_dims, a, b, kernel_size, relu=relu) for a, b in zip(widths[:-1], widths[1:]))
            )

        inputs = [in_channels, *stage_widths[:-1]]
        self.encoder = nn.ModuleList(
            stage([c_in] + [w] * n, relu=True) for c_in, w, n in zip(inputs, stage_widths, stage_convs)
        )
        self.pools = nn.ModuleList(
            Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, return_indices=True) for _ in stage_convs
        )
        self.unpools = nn.ModuleList(_UNPOOL[spatial_dims](kernel_size=2, stride=2) for _ in stage_convs)
        above = [stage_widths[0], *stage_widths[:-1]]
        self.decoder = nn.ModuleList(
            stage([w] * n + [w_above], relu=decoder_relu)
            for w, n, w_above in reversed(list(zip(stage_widths, stage_convs, above)))
        )
        self.head = Conv[Conv.CONV, spatial_dims](stage_widths[0], out_channels, kernel_size=1)
        he_init(self)

    @property
    def label(self) -> str:
        return self._label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        indices = []
        for stage, pool in zip(self.encoder, self.pools):
            x, idx = pool(stage(x))
            indices.append(idx)
        for unpool, stage, idx in zip(self.unpools, self.decoder, reversed(indices)):
            x = stage(unpool(x, idx))
        return self.head(x)


@register_model("segnet")
class SegNet(_IndexEncoderDecoder):
    """SegNet: the 13 convolutions of VGG16 (batch norm, ReLU) with 5 index-keeping
    max-pools, and a mirrored decoder that upsamples with those indices.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        features: width of the first stage; the stages have widths
            ``features * (1, 2, 4, 8, 8)`` (64 in the paper).
        depth: number of VGG16 stages used, 1 to 5 (5 in the paper). Inputs must be
            multiples of ``2**depth``. Width 64 with 3 classes has about 29.4M
            parameters at depth 5 (the paper's 29.5M) and 15.3M at depth 4.

    Example:
        >>> net = SegNet(spatial_dims=3, in_channels=1, out_channels=3, features=16)
        >>> net(torch.zeros(1, 1, 32, 64, 64)).shape
        torch.Size([1, 3, 32, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        depth: int = 5,
    ) -> None:
        if not 1 <= depth <= len(VGG16_STAGE_CONVS):
            raise ValueError(f"SegNet depth must be 1 to {len(VGG16_STAGE_CONVS)} (VGG16 stages), got {depth}")
        super().__init__(
            f"SegNet (depth {depth})",
            spatial_dims,
            in_channels,
            out_channels,
            stage_convs=VGG16_STAGE_CONVS[:depth],
            stage_widths=[features * w for w in VGG16_STAGE_WIDTHS[:depth]],
            kernel_size=3,
            decoder_relu=True,
        )


@register_model("segnet_basic")
class SegNetBasic(_IndexEncoderDecoder):
    """SegNet-Basic, the paper's smaller network for controlled comparisons: one wide-kernel
    convolution (batch norm) per stage, constant width, index-based upsampling, and no
    ReLU in the decoder, as the paper describes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        features: width of every stage (64 in the paper).
        depth: number of encoder/decoder stages (4 in the paper). Inputs must be
            multiples of ``2**depth``.
        kernel_size: odd convolution size (7 in the paper, for a wide context; 3 or 5
            keeps a 3D model affordable).
        decoder_relu: ReLU after the decoder's convolutions (False in the paper).

    Example:
        >>> net = SegNetBasic(spatial_dims=2, in_channels=1, out_channels=2)
        >>> net(torch.zeros(1, 1, 64, 96)).shape
        torch.Size([1, 2, 64, 96])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        depth: int = 4,
        kernel_size: int = 7,
        decoder_relu: bool = False,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        super().__init__(
            f"SegNetBasic (depth {depth})",
            spatial_dims,
            in_channels,
            out_channels,
            stage_convs=[1] * depth,
            stage_widths=[features] * depth,
            kernel_size=kernel_size,
            decoder_relu=decoder_relu,
        )
