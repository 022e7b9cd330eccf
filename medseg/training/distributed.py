"""Several training processes under torchrun: who is who, and the few messages they exchange.

Every rank trains on its own patches through DistributedDataParallel (gloo on CPU, NCCL on
GPU); rank 0 alone validates and writes. The ranks agree, at the end of each epoch, on the
BatchNorm statistics (rank 0's), on whether to stop (rank 0 decides), and within an epoch on
running out of time (any rank may). Outside torchrun (``WORLD_SIZE`` unset or 1) every call
here is a no-op on one process, so the loop reads the same either way.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medseg.device import choose_device

__all__ = ["Distributed", "setup_distributed", "any_rank", "unwrap"]


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that validates, writes the run folder and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: DistributedDataParallel over the ranks, or the model itself."""
        return nn.parallel.DistributedDataParallel(model) if self.active else model

    def share_buffers(self, *modules: nn.Module | None) -> None:
        """Rank 0's buffers (BatchNorm statistics, their averages) on every rank, so all ranks agree."""
        if self.active:
            for buffer in itertools.chain.from_iterable(m.buffers() for m in modules if m is not None):
                dist.broadcast(buffer, 0)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0 (None on the others)."""
        if not self.active:
            return [value]
        if self.is_main:
            gathered: list[Any] = [None] * self.world_size
            dist.gather_object(value, gathered, dst=0)
            return gathered
        dist.gather_object(value, None, dst=0)
        return None

    def decided_by_main(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (rank 0 alone validates, so it alone knows when to stop)."""
        if not self.active:
            return flag
        value = _flag_tensor(flag)
        dist.broadcast(value, 0)
        return bool(value.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup_distributed(device_setting: str) -> tuple[Distributed, torch.device]:
    """This process's rank and its device; initialises the process group under torchrun.

    device_setting: ``train.device`` (auto, cpu, cuda, cuda:N); under torchrun on CUDA each
    rank takes the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    group = Distributed(dist.get_rank(), dist.get_world_size()) if world > 1 else Distributed()
    device = choose_device(device_setting)
    if device.type == "cuda" and group.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return group, device


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank: every rank must stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = _flag_tensor(flag)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _flag_tensor(value: bool) -> torch.Tensor:
    """A one-element tensor where the process group can send it (NCCL needs CUDA)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.tensor([1.0 if value else 0.0], device=device)
