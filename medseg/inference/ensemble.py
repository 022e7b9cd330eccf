"""Ensembles: several trained models segment a scan together by averaging their class probabilities.

nnU-Net's rule: the softmax of each member (after its own test-time mirroring) is averaged
in model space, then the argmax is taken once. Averaging probabilities, not votes, lets a
confident member outweigh an unsure one and keeps ties rare; nnU-Net's 5-fold ensembles gain
a few Dice points over one fold this way. The members share one preprocessing, so the scan
is preprocessed once and every member sees the same model-space tensor; that is why they
must agree on classes, spatial dimensions, input channels and preprocessing (checked on
load, one sentence naming both files otherwise). Each member keeps its own sliding-window
settings (window, overlap, mirroring axes), which do not change the grid.

`Ensemble` presents `Predictor`'s interface (``predict``, ``classes``, ``config``, ``tta``,
``checkpoint_sha256`` ...), so `medseg.pipeline` segments with either unchanged. Its
``checkpoint_sha256`` (the skip rule's model key) covers every member's sha256 and mirroring.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch

from medseg.config import Config
from medseg.inference.predictor import Prediction, Predictor
from medseg.ingest.scan import Scan
from medseg.training.checkpoint import CheckpointError, checkpoint_file
from medseg.training.folds import fold_dirs

__all__ = ["Ensemble", "EnsembleError", "check_members_agree", "load_predictor", "member_files"]


class EnsembleError(CheckpointError):
    """Checkpoints that cannot be averaged: they disagree on classes, grid, channels or preprocessing."""


def member_files(checkpoints: Sequence[Path | str]) -> list[Path]:
    """The checkpoint files the arguments name: a file, a run folder (best.pt), or a run folder of folds (each fold's).

    The same file named twice is refused: it would count twice in the average.
    """
    files: list[Path] = []
    for given in checkpoints:
        path = Path(given)
        try:
            files.append(checkpoint_file(path))
            continue
        except CheckpointError:
            folds = fold_dirs(path)
            if not folds:
                raise
        files += [checkpoint_file(fold) for fold in folds]  # a fold without a checkpoint is named and refused
    seen: dict[Path, Path] = {}
    for file in files:
        key = file.resolve()
        if key in seen:
            raise EnsembleError(
                f"{seen[key]} and {file} are the same checkpoint file; an ensemble averages distinct models, "
                "name each once"
            )
        seen[key] = file
    return files


def _agreement(config: Config) -> dict[str, Any]:
    """What members must share, by what the error calls it."""
    return {
        "classes (data.classes, in output order)": list(config.data.classes.items()),
        "spatial dimensions (model.spatial_dims)": config.model.spatial_dims,
        "input channels (model.in_channels)": config.model.in_channels,
        "colour handling (data.color)": config.data.color,
        "preprocessing (preprocess)": config.preprocess.model_dump(mode="json"),
        "DICOM SEG coding (data.classes_coding)": {
            k: v.model_dump(mode="json") for k, v in (config.data.classes_coding or {}).items()
        },
    }


def check_members_agree(members: Sequence[Predictor]) -> None:
    """Refuse models that cannot share one preprocessing and one argmax, naming both files and what differs."""
    first = members[0]
    expected = _agreement(first.config)
    for other in members[1:]:
        for what, value in _agreement(other.config).items():
            if value != expected[what]:
                raise EnsembleError(
                    f"{first.checkpoint_file} and {other.checkpoint_file} cannot be ensembled: their {what} "
                    f"differ ({_short(expected[what])} vs {_short(value)}); ensemble models trained on the same "
                    "classes and preprocessing, such as the folds of one `medseg train --fold all` run"
                )


def _short(value: Any, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Ensemble:
    """Segments scans with several trained models, averaging their softmax probabilities.

    Args:
        checkpoints: checkpoint files, run folders (best.pt), or run folders of folds
            (``medseg train --fold all``: each ``fold-N`` is a member).
        device, tta, precision, overlap, sw_batch_size, roi_size, keep_largest, fill_holes,
        memory_budget_mb: as for `Predictor`, applied to every member.

    Example::

        ensemble = Ensemble(["runs/unet3d"])  # a run folder holding fold-0 ... fold-4
        prediction = ensemble.predict(load(ref), probabilities=True)
    """

    def __init__(self, checkpoints: Sequence[Path | str], device: str = "auto", **options: Any) -> None:
        if not checkpoints:
            raise EnsembleError("an ensemble needs at least one checkpoint; pass --checkpoint RUN [RUN ...]")
        files = member_files(checkpoints)
        self.members = [Predictor(file, device=device, **options) for file in files]
        check_members_agree(self.members)
        first = self.members[0]
        self.checkpoint_path = " + ".join(str(c) for c in checkpoints)  # what the user named, for the reports
        self.checkpoint_file: Path = first.checkpoint_file
        self.config: Config = first.config
        self.classes: dict[str, int] = first.classes
        self.memory_budget_mb = first.memory_budget_mb
        self.tta = any(m.tta for m in self.members)  # each member's own mirroring is in checkpoint_sha256
        # each member's resolved settings (its own config's defaults where none was given), in one order
        self.settings = {"members": sorted((m.settings for m in self.members), key=lambda x: repr(sorted(x.items())))}

    @property
    def spatial_dims(self) -> int:
        return self.config.model.spatial_dims

    @property
    def checkpoint_files(self) -> tuple[Path, ...]:
        return tuple(m.checkpoint_file for m in self.members)

    @functools.cached_property
    def checkpoint_sha256(self) -> str:
        """One key over every member's checkpoint sha256 and mirroring: any member retrained, added or
        dropped redoes the masks; the order members are named in does not matter to the average."""
        parts = sorted(f"{m.checkpoint_sha256}:tta={int(bool(m.tta))}" for m in self.members)
        return hashlib.sha256(("medseg-ensemble/1\n" + "\n".join(parts)).encode()).hexdigest()

    def model_probabilities(self, data: dict[str, Any]) -> torch.Tensor:
        """The members' mean softmax (K, *model space) for a scan preprocessed by `prepare`."""
        total: torch.Tensor | None = None
        for member in self.members:
            probs = member.model_probabilities(data)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(self.members))

    def prepare(self, scan: Scan) -> dict[str, Any]:
        """Check and preprocess once for every member; the budget counts the running sum too."""
        return self.members[0].prepare(scan, extra_maps=len(self.classes))

    def predict(self, scan: Scan, probabilities: bool = False) -> Prediction:
        """Segment one scan with every member; the argmax of the mean probabilities, on the scan's grid."""
        data = self.prepare(scan)
        return self.members[0].finish(self.model_probabilities(data), data, probabilities)


def load_predictor(checkpoints: Sequence[Path | str], device: str = "auto", **options: Any) -> Predictor | Ensemble:
    """A `Predictor` for one checkpoint file or run folder, else an `Ensemble` (several, or a run folder of folds)."""
    if len(checkpoints) == 1:
        try:
            checkpoint_file(checkpoints[0])
        except CheckpointError:
            pass  # a run folder of folds, or nothing: the Ensemble says which
        else:
            return Predictor(checkpoints[0], device=device, **options)
    return Ensemble(checkpoints, device=device, **options)
