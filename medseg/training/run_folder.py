"""The run folder (``output_dir/name``): what a training run leaves for people and for a resume.

latest.pt (every epoch) and best.pt (the best validation so far), split.json (the role of
every case the data source names), and the learning curves: metrics.csv and metrics.json
(one row per epoch) and learning_curves.png, all rewritten after every epoch. Every file is
written atomically, so a run killed at any moment leaves each of them whole and the curves
up to its last finished epoch. A new run never lands inside its data, and never over
another run without ``--overwrite``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from medseg.config import DataConfig, SplitConfig
from medseg.data.datasets import Case
from medseg.errors import ConfigError, MedsegError
from medseg.files import atomic_path, atomic_write_text, tidy_journal
from medseg.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medseg.training.stopping import SCORE

__all__ = ["RunFolder"]


class RunFolder:
    """Where one training run writes; ``path`` is created by the first write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def new(cls, path: Path, data: DataConfig, overwrite: bool) -> RunFolder:
        """The folder for a new run: outside every data folder, and not holding a run unless ``overwrite``."""
        _check_outside_data(path, data)
        if (path / "latest.pt").exists() and not overwrite:
            raise MedsegError(
                f"{path} already holds a training run; resume it with --resume {path}, "
                f"start over with --overwrite, or choose another name (--set name=...)"
            )
        return cls(path)

    @classmethod
    def resumed(cls, path: Path) -> RunFolder:
        """The folder of a run to continue (it must hold a latest.pt)."""
        if not (path / "latest.pt").is_file():
            raise MedsegError(
                f"{path}: no latest.pt to resume from; pass the run folder a previous `medseg train` wrote"
            )
        return cls(path)

    @property
    def latest(self) -> Path:
        return self.path / "latest.pt"

    def resume_state(self) -> Checkpoint:
        """The run's latest.pt with the training state a resume needs (a predict-only file has none)."""
        state = load_checkpoint(self.latest)
        if state.training is None:
            raise MedsegError(
                f"{self.latest}: holds weights but no training state to resume from; "
                "start a new run (--overwrite) or pass the folder of the run that wrote it"
            )
        return state

    def write_split(
        self,
        split: SplitConfig,
        train_cases: Sequence[Case],
        val_cases: Sequence[Case],
        all_cases: Sequence[Case] = (),
    ) -> Path:
        """split.json: the role of every case, so a run says what it did and ``--split val`` can repeat it.

        Each case of ``all_cases`` (what the data source names) is in exactly one list: train,
        val, unused (labelled but in neither, e.g. a manifest's test cases or ids a ``cases``
        split does not list) or unlabelled (no reference mask: never trains).
        """
        chosen = {c.id for c in train_cases} | {c.id for c in val_cases}
        payload = {
            "mode": split.mode,
            "fold": split.fold if split.mode == "kfold" else None,
            "folds": split.folds if split.mode == "kfold" else None,
            "seed": split.seed,
            "train": [c.id for c in train_cases],
            "val": [c.id for c in val_cases],
            "unused": [c.id for c in all_cases if c.label is not None and c.id not in chosen],
            "unlabelled": [c.id for c in all_cases if c.label is None],
        }
        return atomic_write_text(self.path / "split.json", json.dumps(payload, indent=2) + "\n")

    def save(self, checkpoint: Checkpoint, best: bool) -> None:
        """latest.pt, and best.pt too when this epoch is the best so far."""
        save_checkpoint(checkpoint, self.latest)
        if best:
            save_checkpoint(checkpoint, self.path / "best.pt")

    def write_curves(self, history: list[dict[str, float]], best_epoch: int, best_metrics: Mapping[str, float]) -> None:
        """The learning curves so far: metrics.csv, metrics.json and learning_curves.png.

        Called after every epoch, so a killed run keeps them up to its last finished epoch.
        metrics.json adds which epoch best.pt holds (null before any validation; without
        validation cases best.pt is the latest); values that are not finite (a class absent
        from every validation case) are null there, as JSON has no NaN.
        """
        from medseg.evaluation.plots import plot_learning_curves

        keys: list[str] = []
        for row in history:
            keys.extend(k for k in row if k not in keys)
        with atomic_path(self.path / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        payload = {
            "score": SCORE,
            "best_epoch": best_epoch or None,
            "best": _finite(best_metrics),
            "epochs": [_finite(row) for row in history],
        }
        atomic_write_text(self.path / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
        plot_learning_curves(history, self.path / "learning_curves.png")

    def finish(self) -> None:
        """No empty journal folder left behind once the run's writes are done."""
        tidy_journal(self.path)


def _finite(row: Mapping[str, float]) -> dict[str, float | None]:
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}


def _check_outside_data(run_dir: Path, data: DataConfig) -> None:
    """Training never writes into its data: the run folder and every data folder must be disjoint."""
    from medseg.pipeline import OutputUnwritable, check_disjoint

    for key in ("images", "labels", "root"):
        folder = getattr(data, key)
        if folder is None or not Path(folder).exists():
            continue
        try:
            check_disjoint(Path(folder), run_dir)
        except OutputUnwritable:
            raise ConfigError(
                f"the run folder {run_dir} (output_dir/name) and data.{key} {folder} overlap; "
                "training never writes into its data: set output_dir to a folder outside it"
            ) from None
