"""How much memory one training step of a model takes, counted without allocating it.

nnU-Net estimates a plan's memory from a formula over its feature maps, calibrated once
against a GPU. Here the model itself is built and run forward on PyTorch's meta device
(tensors with shapes and no data: a few milliseconds whatever the patch size), and every
tensor autograd saves for the backward pass is counted, each storage once (an in-place
ReLU and the convolution after it save the same tensor). That is the activation memory
of this exact code, whatever the model family, norm or width, with no calibration to go
stale. Weights, gradients and the optimiser's state are added from the parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["StepMemory", "training_step_memory"]

# fp32 bytes; autocast (bf16/fp16) roughly halves the activations, so fp32 is the bound that holds everywhere.
_BYTES = 4
# Copies of the parameters a step holds: weights, gradients, and two optimiser buffers (Adam's moments;
# SGD with momentum needs one).
_PARAMETER_COPIES = 4
# Tensors of the size of the logits the loss holds: the fp32 logits, their softmax and the one-hot target.
_LOSS_COPIES = 3


class StepMemory(tuple):
    """(fixed, per_sample) bytes: a step with batch B takes ``fixed + B * per_sample``."""

    __slots__ = ()

    def __new__(cls, fixed: int, per_sample: int) -> StepMemory:
        return super().__new__(cls, (int(fixed), int(per_sample)))

    @property
    def fixed(self) -> int:
        return self[0]

    @property
    def per_sample(self) -> int:
        return self[1]

    def total(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample


def training_step_memory(model: Mapping[str, Any], patch: Sequence[int]) -> StepMemory:
    """Bytes of one training step of ``model`` (a ``model:`` config section as a dict) on ``patch``.

    Activations grow linearly with the batch, so they are counted for one sample and the
    caller multiplies. The count is exact for the tensors autograd saves (the bulk of the
    memory); the framework's temporary workspaces come on top (cuDNN, oneDNN: typically
    a few hundred MB), which is why a plan keeps a margin below the machine's memory.
    """
    options = tuple(sorted((str(k), repr(v)) for k, v in dict(model.get("options") or {}).items()))
    key = tuple((k, model.get(k)) for k in ("name", "spatial_dims", "in_channels", "out_channels", "features", "depth"))
    return _measure(key, options, tuple(int(p) for p in patch))


@lru_cache(maxsize=1024)
def _measure(key: tuple, options: tuple, patch: tuple[int, ...]) -> StepMemory:
    import ast

    import torch

    from medseg.models import build_model

    config = dict(key)
    config["options"] = {k: ast.literal_eval(v) for k, v in options}
    saved: dict[int, int] = {}
    anonymous = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal anonymous
        storage = tensor.untyped_storage()
        # _cdata identifies the storage (also on the meta device, where every data pointer is 0); should a
        # PyTorch version drop it, each saved tensor is counted on its own: an upper bound, about 1.35x.
        ident = getattr(storage, "_cdata", None)
        size = tensor.numel() * tensor.element_size() if ident is None else storage.nbytes()
        if ident is None:
            anonymous += size
        else:
            saved[ident] = size
        return tensor

    with torch.device("meta"):
        net = build_model(config)
        net.train()
        x = torch.zeros(1, int(config["in_channels"]), *patch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(x)
    parameters = sum(p.numel() for p in net.parameters())
    input_bytes = math.prod(x.shape) * _BYTES
    loss_bytes = _LOSS_COPIES * logits.numel() * _BYTES
    per_sample = sum(saved.values()) + anonymous + input_bytes + loss_bytes
    return StepMemory(_PARAMETER_COPIES * parameters * _BYTES, per_sample)
