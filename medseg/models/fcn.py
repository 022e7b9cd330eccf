"""FCN-32s, FCN-16s and FCN-8s after Long, Shelhamer and Darrell, CVPR 2015 (arXiv:1411.4038).

A VGG16 backbone whose fully connected layers are convolutions scores every position
of the stride-32 map; transposed convolutions with bilinear kernels bring the scores
back up. FCN-16s and FCN-8s first add scores computed from pool4 and pool3, so the
coarse semantics gain the shallower layers' detail.

The original pads the input by 100 and crops with per-layer offsets so that any size
works. Here every convolution is 'same'-padded and the input must be a multiple of 32,
so each upsampled map lines up with its skip exactly and the output has the input's
size without cropping; ``size_divisor`` tells inference what to pad to.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from torch import nn
from torch.nn import functional as F

from medseg.models.base import SegmentationModel
from medseg.models.blocks import conv_block, he_init
from medseg.models.registry import register_model

__all__ = ["FCN", "BilinearUpsample", "bilinear_kernel"]

VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)
VGG16_STAGE_WIDTHS = (1, 2, 4, 8, 8)
OUTPUT_STRIDES = (32, 16, 8)
_CONV_TRANSPOSE = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


def bilinear_kernel(factor: int, spatial_dims: int) -> torch.Tensor:
    """The (2*factor)^spatial_dims kernel with which a stride-``factor`` transposed
    convolution performs (bi/tri)linear interpolation.

    The N-d kernel is the outer product of 1-d tent filters, so interpolation is
    separable and a constant input stays constant away from the borders.

    Example:
        >>> bilinear_kernel(2, 2).shape
        torch.Size([4, 4])
    """
    size = 2 * factor
    center = factor - 0.5
    tent = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    kernel = tent
    for _ in range(spatial_dims - 1):
        kernel = kernel[..., None] * tent
    return kernel.float()


def _learned_upsampler(spatial_dims: int, channels: int, factor: int) -> nn.Module:
    """Transposed convolution that multiplies the size by ``factor``, initialised to bilinear.

    Kernel 2*factor, stride factor and padding factor/2 give exactly factor x the size,
    aligned like ``align_corners=False`` interpolation (the original's crop offsets).
    Each class starts upsampled on its own: off-diagonal kernels start at zero.
    """
    up = Conv[Conv.CONVTRANS, spatial_dims](
        channels, channels, kernel_size=2 * factor, stride=factor, padding=factor // 2, bias=False
    )
    with torch.no_grad():
        up.weight.zero_()
        kernel = bilinear_kernel(factor, spatial_dims)
        for c in range(channels):
            up.weight[c, c] = kernel
    return up


class BilinearUpsample(nn.Module):
    """Fixed (not learned) bilinear/trilinear upsampling by ``factor`` as a transposed convolution.

    The paper fixes the final upsampling to bilinear and learns only the 2x ones. Being
    fixed, it is applied per channel with a non-persistent buffer: no parameters, nothing
    in the state dict, and no 64^3 x classes^2 kernel for a 3D FCN-32s.

    Example:
        >>> BilinearUpsample(2, channels=3, factor=8)(torch.ones(1, 3, 4, 4)).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, spatial_dims: int, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.channels = channels
        self.spatial_dims = spatial_dims
        kernel = bilinear_kernel(factor, spatial_dims)
        self.register_buffer("weight", kernel.expand(channels, 1, *kernel.shape).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV_TRANSPOSE[self.spatial_dims](
            x, self.weight.to(x.dtype), stride=self.factor, padding=self.factor // 2, groups=self.channels
        )


@register_model("fcn8s", output_stride=8)
@register_model("fcn16s", output_stride=16)
@register_model("fcn32s", output_stride=32)
class FCN(SegmentationModel):
    """Fully convolutional network on a VGG16 backbone, at output stride 32, 16 or 8.

    Layers (names as in the paper's Caffe models): ``backbone`` (5 VGG16 stages, each
    ending with a 2x2 max-pool), ``fc`` (fc6 and fc7 as convolutions, ReLU, dropout),
    ``score_fr`` (1x1 class scores). FCN-16s upsamples those 2x (``upscore2``) and adds
    ``score_pool4``; FCN-8s upsamples the sum 2x again (``upscore_pool4``) and adds
    ``score_pool3``; ``upscore`` then upsamples by the output stride (32, 16 or 8).
    As in the paper, the 2x layers are transposed convolutions initialised to bilinear
    interpolation and then learned, while the final ``upscore`` stays fixed bilinear;
    ``score_pool3``/``score_pool4`` start at zero, so a finer net starts from its
    coarser parent's predictions. All other convolutions use He initialisation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        features: width of the first VGG16 stage; stages have ``features * (1, 2, 4, 8, 8)``.
        output_stride: 32, 16 or 8; the registry's ``fcn32s``, ``fcn16s`` and ``fcn8s`` are this
            class with the stride fixed (not a config option there).
        fc_features: width of fc6/fc7; default ``64 * features`` (4096 at width 64, as in
            VGG16).
        fc_kernel_size: odd kernel of fc6 ('same' padded); default 7 in 2D (VGG16's
            7x7 pool5 window) and 3 in 3D, because a 7x7x7 fc6 at width 64 alone would
            hold 719M parameters.
        batch_norm: batch norm after the backbone's convolutions. On by default: there
            are no ImageNet weights here and the 16-layer backbone trains from scratch
            far more reliably with it; False gives the paper's plain VGG16.
        dropout: dropout after fc6 and fc7 (0.5 in the paper); 0 disables it.

    Example:
        >>> net = FCN(spatial_dims=2, in_channels=1, out_channels=2, features=16, output_stride=8)
        >>> net(torch.zeros(1, 1, 64, 96)).shape
        torch.Size([1, 2, 64, 96])
    """

    size_divisor = 32

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        output_stride: int = 8,
        fc_features: int | None = None,
        fc_kernel_size: int | None = None,
        batch_norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        fc_features = 64 * features if fc_features is None else fc_features
        fc_kernel_size = (7 if spatial_dims == 2 else 3) if fc_kernel_size is None else fc_kernel_size
        if fc_kernel_size < 1 or fc_kernel_size % 2 == 0:
            raise ValueError(f"fc_kernel_size must be odd so that padding keeps the size, got {fc_kernel_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.output_stride = output_stride

        conv = Conv[Conv.CONV, spatial_dims]
        widths = [features * w for w in VGG16_STAGE_WIDTHS]
        self.backbone = nn.ModuleList(
            nn.Sequential(
                *(
                    conv_block(spatial_dims, a, b, norm="batch" if batch_norm else None)
                    for a, b in zip([c_in] + [w] * (n - 1), [w] * n)
                )
            )
            for c_in, w, n in zip([in_channels, *widths[:-1]], widths, VGG16_STAGE_CONVS)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)

        def drop() -> nn.Module:
            return Dropout[Dropout.DROPOUT, spatial_dims](dropout) if dropout > 0 else nn.Identity()

        self.fc = nn.Sequential(
            conv(widths[-1], fc_features, kernel_size=fc_kernel_size, padding=fc_kernel_size // 2),
            nn.ReLU(inplace=True),
            drop(),
            conv(fc_features, fc_features, kernel_size=1),
            nn.ReLU(inplace=True),
            drop(),
        )
        self.score_fr = conv(fc_features, out_channels, kernel_size=1)
        learned: list[nn.Module] = []
        skips: list[nn.Module] = []
        if output_stride <= 16:
            self.upscore2 = _learned_upsampler(spatial_dims, out_channels, 2)
            self.score_pool4 = conv(widths[3], out_channels, kernel_size=1)
            learned.append(self.upscore2)
            skips.append(self.score_pool4)
        if output_stride == 8:
            self.upscore_pool4 = _learned_upsampler(spatial_dims, out_channels, 2)
            self.score_pool3 = conv(widths[2], out_channels, kernel_size=1)
            learned.append(self.upscore_pool4)
            skips.append(self.score_pool3)
        self.upscore = BilinearUpsample(spatial_dims, out_channels, output_stride)
        he_init(self, skip=learned + skips)
        for layer in skips:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def label(self) -> str:
        return f"FCN-{self.output_stride}s"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pooled = []
        for stage in self.backbone:
            x = self.pool(stage(x))
            pooled.append(x)
        score = self.score_fr(self.fc(x))
        if self.output_stride <= 16:
            score = self.upscore2(score) + self.score_pool4(pooled[3])
        if self.output_stride == 8:
            score = self.upscore_pool4(score) + self.score_pool3(pooled[2])
        return self.upscore(score)
