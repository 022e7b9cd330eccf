"""What every medseg model shares: its spatial dimensions, channels, size divisor, and the input check.

Why a base: each family used to set the same attributes and call the same input check with
its own copy of the arguments; inference and the checkpoint fit check read ``spatial_dims``,
``in_channels``, ``out_channels`` and ``size_divisor`` from any model, so they live in one place.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.blocks import check_input, check_spatial_dims

__all__ = ["SegmentationModel"]


class SegmentationModel(nn.Module):
    """A segmentation network: (batch, in_channels, *spatial) in, (batch, out_channels, *spatial) out.

    Subclasses set ``size_divisor`` (the multiple every input spatial size must be) and may
    override ``label``, the name the input errors use.
    """

    size_divisor: int = 1

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels

    @property
    def label(self) -> str:
        """The model's name in error messages."""
        return type(self).__name__

    def check_input(self, x: torch.Tensor, size_divisor: int | None = None) -> None:
        """Raise `InputSizeError` naming the axis and the size to pad to, before the first layer runs."""
        divisor = self.size_divisor if size_divisor is None else size_divisor
        check_input(x, self.label, self.spatial_dims, self.in_channels, divisor)
