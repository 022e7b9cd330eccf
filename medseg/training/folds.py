"""Cross-validation: train the k folds of a config's split, each in its own run folder under one parent.

``medseg train --config C --fold all`` trains fold 0..k-1 of ``data.split`` (mode kfold:
the manifest's fixed folds where it declares them, else folds drawn with ``split.seed``)
into ``output_dir/name/fold-N``; each fold folder is an ordinary run (best.pt, latest.pt,
split.json, metrics.csv), so it resumes, predicts and evaluates like any other. The parent's
``folds.json`` records each fold as it finishes with its best validation scores, and their
mean over folds: nnU-Net's cross-validation summary. A parent folder of folds is also an
ensemble for `medseg predict` (`medseg.inference.ensemble`).

Why a marker file: a fold killed mid-run and one that ended early (time budget, early
stopping) look alike from their checkpoints; only a fold recorded here is finished, so
``--resume`` skips exactly those, resumes the one that was interrupted and starts the rest.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medseg.config import Config
from medseg.errors import ConfigError, MedsegError
from medseg.files import atomic_write_text

__all__ = ["FOLDS_FILE", "FoldsResult", "fold_config", "fold_dirs", "read_folds_record", "train_folds"]

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"
_FOLD_DIR = re.compile(r"fold-(\d{1,3})")


def fold_dirs(run_dir: Path) -> list[Path]:
    """The ``fold-N`` folders of a cross-validation run, in fold order (empty for any other folder)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _FOLD_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def fold_config(config: Config, fold: int) -> Config:
    """The config of one fold: split fold ``fold``, run folder ``output_dir/name/fold-N``."""
    split = config.data.split
    if split.mode != "kfold":
        raise ConfigError(
            f"--fold trains the folds of a k-fold split, but data.split.mode is {split.mode!r}; "
            f"set it with --set data.split.mode=kfold (and data.split.folds=K, default {split.folds})"
        )
    if not 0 <= fold < split.folds:
        raise ConfigError(f"--fold {fold}: data.split.folds is {split.folds}, so folds are 0..{split.folds - 1}")
    data = config.data.model_copy(update={"split": split.model_copy(update={"fold": fold})})
    return config.model_copy(
        update={"data": data, "name": f"fold-{fold}", "output_dir": config.output_dir / config.name}
    )


@dataclass
class FoldsResult:
    """Where the folds are and their best validation scores (fold → scores), with the mean over folds."""

    run_dir: Path
    folds: int
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def mean_metrics(self) -> dict[str, float]:
        """Each validation score averaged over the finished folds (nan-aware; keys every fold has)."""
        rows = [f["best_metrics"] for f in self.finished.values()]
        keys = [k for k in (rows[0] if rows else {}) if all(k in r for r in rows)]
        mean = {}
        for key in keys:
            values = [float(r[key]) for r in rows if math.isfinite(float(r[key]))]
            mean[key] = sum(values) / len(values) if values else float("nan")
        return mean

    def summary(self, config_path: Path | str = "CONFIG") -> list[str]:
        """Lines for a person: each fold's best epoch and mean Dice, the mean over folds, how to predict."""
        lines = []
        for fold, entry in sorted(self.finished.items()):
            dice = float(entry["best_metrics"].get("mean_dice", float("nan")))
            lines.append(
                f"fold {fold}: best epoch {entry['best_epoch']}, mean_dice={dice:.4f} ({self.run_dir}/fold-{fold})"
            )
        mean = self.mean_metrics
        if mean:
            scores = ", ".join(f"{k}={v:.4f}" for k, v in sorted(mean.items()) if k != "train_loss")
            lines.append(f"Mean over {len(self.finished)} of {self.folds} folds: {scores}")
        lines.append(f"Record: {self.run_dir / FOLDS_FILE}")
        lines.append(
            f"Predict with the ensemble of the folds: medseg predict --checkpoint {self.run_dir} --input ... "
            f"--output ...; the held-out cases: medseg predict --config {config_path} --split val --output ..."
        )
        return lines

    def payload(self) -> dict[str, Any]:
        return {
            "folds": self.folds,
            "finished": {str(k): v for k, v in sorted(self.finished.items())},
            "mean_metrics": self.mean_metrics,
        }


def read_folds_record(run_dir: Path, folds: int) -> FoldsResult:
    """The folds recorded finished in ``run_dir/folds.json`` (none if it is absent); the file is checked."""
    path = run_dir / FOLDS_FILE
    result = FoldsResult(run_dir, folds)
    if not path.exists():
        return result
    fix = "remove it to retrain every fold, or start over with --overwrite"
    try:
        raw = json.loads(path.read_bytes()[: 1 << 20])
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: not a readable folds record ({exc}); {fix}") from None
    finished = raw.get("finished") if isinstance(raw, dict) else None
    if not isinstance(finished, dict) or raw.get("folds") != folds:
        shown = raw.get("folds") if isinstance(raw, dict) else None
        raise MedsegError(
            f"{path}: records {shown!r} folds where the config has data.split.folds {folds}, or no finished "
            f"folds; {fix}"
        )
    for key, entry in finished.items():
        ok = (
            isinstance(key, str)
            and key.isdigit()
            and int(key) < folds
            and isinstance(entry, dict)
            and isinstance(entry.get("best_epoch"), int)
            and isinstance(entry.get("best_metrics"), dict)
            and all(isinstance(v, (int, float)) for v in entry["best_metrics"].values())
        )
        if not ok:
            raise MedsegError(f"{path}: fold entry {key!r} is not one medseg wrote; {fix}")
        result.finished[int(key)] = entry
    return result


def _check_parent(run_dir: Path, todo: Sequence[int], resume: bool, overwrite: bool) -> None:
    """Refuse before any fold trains: a single run in the parent, or folds that exist without --resume/--overwrite."""
    if (run_dir / "latest.pt").exists():
        raise MedsegError(
            f"{run_dir} holds a single training run, not folds; choose another name (--set name=...) "
            "for the cross-validation run"
        )
    if resume or overwrite:
        return
    existing = [k for k in todo if (run_dir / f"fold-{k}" / "latest.pt").exists()]
    if existing:
        raise MedsegError(
            f"{run_dir} already holds fold(s) {existing}; go on with --resume {run_dir} (finished folds are "
            "kept), start over with --overwrite, or choose another name (--set name=...)"
        )


def train_folds(
    config: Config,
    fold: str | int = "all",
    resume: Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> FoldsResult:
    """Train fold ``fold`` (or every fold, 'all') of the config's k-fold split, fold after fold.

    resume: the parent run folder (``output_dir/name``) of an interrupted run: folds recorded
    finished are skipped, a fold with a latest.pt is resumed, the others start.
    """
    from medseg.training.loop import train

    k = config.data.split.folds
    todo = list(range(k)) if fold == "all" else [int(fold)]
    configs = {i: fold_config(config, i) for i in todo}  # every fold's config checked before any trains
    run_dir = Path(resume) if resume is not None else config.output_dir / config.name
    if resume is not None and not run_dir.is_dir():
        raise MedsegError(f"--resume {run_dir}: no such run folder; pass the folder `--fold` trained into")
    _check_parent(run_dir, todo, resume is not None, overwrite)
    # folds trained by other calls (--fold N on another machine) stay recorded; --fold all --overwrite starts afresh
    record = FoldsResult(run_dir, k) if overwrite and fold == "all" else read_folds_record(run_dir, k)
    for i in todo:
        if i in record.finished and resume is not None:
            log.info("fold %d of %s: finished before, kept", i, run_dir)
            continue
        fold_cfg = configs[i].model_copy(update={"output_dir": run_dir})
        fold_dir = run_dir / f"fold-{i}"
        again = resume is not None and (fold_dir / "latest.pt").is_file()
        log.info("fold %d of %d: %s %s", i, k, "resuming" if again else "training", fold_dir)
        result = train(fold_cfg, resume=fold_dir if again else None, overwrite=overwrite, progress=progress)
        record.finished[i] = {
            "run_dir": fold_dir.name,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_metrics": {k_: float(v) for k_, v in result.best_metrics.items()},
        }
        if _writes():
            atomic_write_text(run_dir / FOLDS_FILE, json.dumps(record.payload(), indent=2) + "\n")
    return record


def _writes() -> bool:
    """Only rank 0 of a torchrun job writes (the others validate nothing, so their scores are empty)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
