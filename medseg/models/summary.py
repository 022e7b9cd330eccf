"""Size, cost and receptive field of a model for one input size, for reports and model choice."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["count_macs", "model_summary", "receptive_field"]


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``x``, counted by forward hooks.

    Convolutions, transposed convolutions and linear layers only: they dominate the
    cost of these networks; norms, activations and pooling are left out.
    """
    return _macs_and_output_shape(model, x)[0]


def _macs_and_output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # every input element meets a full kernel for each output channel of its group
            per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
            total += inputs[0].numel() * per_input
        elif isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return total, tuple(out.shape)


def receptive_field(model: nn.Module, x: torch.Tensor, probes: int = 3) -> tuple[tuple[int, ...], bool]:
    """Empirical receptive field of the central output voxel, measured on inputs shaped like ``x``.

    The extent, per spatial axis, of the input voxels with a non-zero gradient of the
    central output voxel (summed over channels), at the model's current weights. One
    random input can leave that voxel's ReLUs dead or route max-pools around part of the
    field, so the gradients of ``x`` and ``probes - 1`` random inputs are combined. The
    second value is True when the region touches the input's border: the true field is
    then at least the reported extent, so pass a bigger input to see all of it.
    """
    touched = torch.zeros(x.shape[2:], dtype=torch.bool, device=x.device)
    for probe in range(max(1, probes)):
        inp = (x if probe == 0 else torch.randn_like(x)).detach().clone().requires_grad_(True)
        out = model(inp)
        centre = (slice(None), slice(None), *(s // 2 for s in out.shape[2:]))
        (grad,) = torch.autograd.grad(out[centre].sum(), inp)  # leaves the parameters' .grad alone
        touched |= grad.abs().sum(dim=(0, 1)) > 0
    nonzero = touched.nonzero()
    if nonzero.numel() == 0:
        return tuple(0 for _ in touched.shape), False
    low, high = nonzero.min(dim=0).values, nonzero.max(dim=0).values
    extent = tuple(int(hi - lo) + 1 for lo, hi in zip(low, high))
    clipped = bool((low == 0).any() or any(int(h) == s - 1 for h, s in zip(high, touched.shape)))
    return extent, clipped


def model_summary(
    model: nn.Module,
    input_size: Sequence[int],
    in_channels: int | None = None,
    measure_receptive_field: bool = True,
) -> dict[str, Any]:
    """Parameters, cost and receptive field of ``model`` for one input of spatial size ``input_size``.

    Runs one forward pass (batch 1, eval mode; the model's mode is restored after) for
    the cost and three forward/backward passes for the receptive field, so keep the
    input small for big models.

    Args:
        model: any medseg model (or module taking (batch, channels, *spatial)).
        input_size: spatial size, e.g. (256, 256) or (64, 128, 128).
        in_channels: input channels; default ``model.in_channels``.
        measure_receptive_field: also measure the receptive field (three backward passes).

    Returns:
        ``parameters``, ``trainable_parameters``; ``macs`` (multiply-accumulates of
        convolution, transposed-convolution and linear layers) and ``flops`` (= 2 x macs);
        ``input_shape``, ``output_shape``; ``receptive_field`` (extent per axis, see
        :func:`receptive_field`) and ``receptive_field_clipped``.

    Example:
        >>> model_summary(UNet(2, 1, 2, features=8), (64, 64))["macs"]
    """
    channels = in_channels if in_channels is not None else getattr(model, "in_channels", None)
    if channels is None:
        raise ValueError("model has no in_channels attribute; pass in_channels")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, channels, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        macs, out_shape = _macs_and_output_shape(model, x)
        summary: dict[str, Any] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "macs": macs,
            "flops": 2 * macs,
            "input_shape": tuple(x.shape),
            "output_shape": out_shape,
        }
        if measure_receptive_field:
            extent, clipped = receptive_field(model, x)
            summary["receptive_field"] = extent
            summary["receptive_field_clipped"] = clipped
    finally:
        model.train(was_training)
    return summary
