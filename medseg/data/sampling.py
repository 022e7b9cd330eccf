"""Training items in memory and the random patches drawn from them.

All randomness comes from one torch.Generator, so a run is reproducible and a resumed
run draws exactly the patches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from medseg.data.augment import ElasticAugment

__all__ = ["Item", "PatchSampler", "PatchBatches"]

# Voxel positions kept per class for foreground sampling (enough to cover any volume).
_MAX_POSITIONS = 20000


@dataclass
class Item:
    """One training image: (C, *spatial) float image and (T, *spatial) float target
    (channel 0: class index; channel 1, if present: the loss weight map)."""

    id: str
    image: torch.Tensor
    target: torch.Tensor

    def __post_init__(self) -> None:
        if self.image.shape[1:] != self.target.shape[1:]:
            raise ValueError(f"{self.id}: image {tuple(self.image.shape)} and target {tuple(self.target.shape)} differ")


class PatchSampler:
    """Random patches of ``patch_size``; with probability ``foreground_oversample`` a patch
    is centred on a voxel of a class drawn uniformly among the classes present except the
    item's most frequent one (its background), so rare classes are seen as often as
    common ones whatever their label order."""

    def __init__(
        self,
        items: Sequence[Item],
        patch_size: Sequence[int],
        foreground_oversample: float,
        generator: torch.Generator,
    ) -> None:
        if not items:
            raise ValueError("no training items")
        self.items = list(items)
        self.patch = tuple(int(p) for p in patch_size)
        self.oversample = foreground_oversample
        self.generator = generator
        self.positions = [self._class_positions(item) for item in self.items]

    def _class_positions(self, item: Item) -> list[torch.Tensor]:
        labels = item.target[0].reshape(-1).long()
        values, counts = torch.unique(labels, return_counts=True)
        if values.numel() > 1:
            values = values[counts != counts.max()] if (counts == counts.max()).sum() == 1 else values
        found = []
        for value in values.tolist():
            flat = torch.nonzero(labels == value).squeeze(1)
            if flat.numel() > _MAX_POSITIONS:
                step = flat.numel() // _MAX_POSITIONS
                flat = flat[::step]
            found.append(flat)
        return found

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=self.generator).item())

    def _start(self, item_index: int) -> list[int]:
        item = self.items[item_index]
        shape = item.image.shape[1:]
        use_class = float(torch.rand(1, generator=self.generator).item()) < self.oversample
        if use_class:
            classes = self.positions[item_index]
            flat = classes[self._randint(len(classes))]
            centre = torch.unravel_index(flat[self._randint(flat.numel())], tuple(shape))
            return [min(max(int(c) - p // 2, 0), max(s - p, 0)) for c, p, s in zip(centre, self.patch, shape)]
        return [self._randint(s - p + 1) for p, s in zip(self.patch, shape)]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *patch) images and (B, T, *patch) targets."""
        images, targets = [], []
        for _ in range(batch_size):
            index = self._randint(len(self.items))
            item = self.items[index]
            start = self._start(index)
            window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            images.append(_pad_to(item.image[window], self.patch))
            targets.append(_pad_to(item.target[window], self.patch))
        return torch.stack(images), torch.stack(targets)


class PatchBatches:
    """One epoch's batches, as the torchvision reference's data loader gives them: ``steps``
    batches of random patches, moved to the device and augmented there (with the sampler's
    generator, so a resumed run draws and deforms exactly what the whole run would have)."""

    def __init__(
        self,
        sampler: PatchSampler,
        augment: ElasticAugment | None,
        batch_size: int,
        steps: int,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.sampler, self.augment, self.batch_size, self.steps = sampler, augment, batch_size, steps
        self.device, self.channels_last = device, channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            images, targets = self.sampler.sample(self.batch_size)
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            if self.augment is not None:
                images, targets = self.augment(images, targets, generator=self.sampler.generator)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, targets


def _pad_to(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad (C, *spatial) at the end of each axis up to ``size`` (items smaller than a patch)."""
    missing = [max(p - s, 0) for p, s in zip(size, tensor.shape[1:])]
    if not any(missing):
        return tensor
    pad: list[int] = []
    for m in reversed(missing):
        pad.extend([0, m])
    return F.pad(tensor, pad)
