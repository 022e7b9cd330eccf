"""Which cases `medseg predict --config C --split ROLE` (or ``--cases ID ...``) segments, and with which model.

The cases come from the config's data source (a manifest dataset, image/label folders or a
CSV), chosen by id: those the run folder's split.json records under the role, or those
named. The model is the run's. For a run folder of folds (``--fold all``) the validation
split is the out-of-fold one, as nnU-Net's cross-validation predicts it: each case by the
one fold that held it out, never by a model that trained on it; named cases go to the
ensemble of every fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medseg.config import Config
from medseg.data.datasets import Case, find_cases
from medseg.data.recorded_split import RecordedSplit, SplitRecordError, read_split
from medseg.errors import ConfigError
from medseg.files import natural_key
from medseg.inference.ensemble import check_members_agree, load_predictor
from medseg.inference.predictor import Predictor
from medseg.ingest import ScanRef
from medseg.training.folds import fold_dirs

__all__ = ["Selection", "select_cases"]


@dataclass
class Selection:
    """Each chosen scan with the predictor that segments it, and what the reports name as the model."""

    batch: list[tuple[ScanRef, Any]]
    checkpoint: str
    source: str  # a sentence for the user: which cases, from where


def _scan_of(case: Case) -> ScanRef:
    """The case's image as a scan named by the case id (so masks pair with its reference by name)."""
    if len(case.images) != 1:
        raise ConfigError(
            f"case {case.id} has {len(case.images)} channel files ({case.images[0].path} ...); medseg predict "
            "reads one image file per scan, so multi-file cases cannot be predicted by --split or --cases yet"
        )
    image = case.images[0]
    return ScanRef(case.id, image.kind, image.paths)


def _known(ids: Sequence[str], cases: dict[str, Case], config: Config, where: str) -> None:
    unknown = [i for i in ids if i not in cases]
    if unknown:
        source = config.source or "the config"
        raise SplitRecordError(
            f"{where} names case(s) {unknown[:5]} that the data of {source} does not hold "
            f"({len(cases)} cases, e.g. {sorted(cases, key=natural_key)[:3]}); check the case ids and data source"
        )


def select_cases(
    config: Config,
    role: str | None = None,
    case_ids: Sequence[str] | None = None,
    checkpoints: Sequence[Path] | None = None,
    **predictor_options: Any,
) -> Selection:
    """The cases of ``role`` recorded in the run folder's split.json, or the cases ``case_ids``, with their models.

    checkpoints: the run folder(s) or files to predict with (default: the config's run folder,
    ``output_dir/name``); ``role`` reads the split of exactly one. predictor_options go to
    every `Predictor` (device, tta, precision, ...).
    """
    if (role is None) == (not case_ids):
        raise ConfigError("choose the cases either by role (--split train|val) or by id (--cases ID ...), not both")
    runs = list(checkpoints or [config.output_dir / config.name])
    cases = {c.id: c for c in find_cases(config.data)}
    if case_ids:
        ids = list(dict.fromkeys(case_ids))
        _known(ids, cases, config, "--cases")
        predictor = load_predictor(runs, **predictor_options)
        named = " + ".join(map(str, runs))
        batch = [(_scan_of(cases[i]), predictor) for i in ids]
        return Selection(batch, named, f"{len(ids)} named case(s) with {named}")
    if len(runs) != 1:
        raise ConfigError(
            f"--split {role} reads the split one run recorded, but {len(runs)} checkpoints were given; "
            "pass one run folder (or a run folder of folds), or name the cases with --cases"
        )
    run = Path(runs[0])
    run_dir = run if run.is_dir() else run.parent
    folds = fold_dirs(run_dir) if not (run_dir / "split.json").exists() else []
    if not folds:
        split = read_split(run_dir)
        ids = list(split.cases(role))
        _known(ids, cases, config, str(split.path))
        predictor = load_predictor([run], **predictor_options)
        batch = [(_scan_of(cases[i]), predictor) for i in ids]
        return Selection(batch, str(run), f"the {len(ids)} {role} case(s) recorded in {split.path}")
    return _out_of_fold(run_dir, folds, role, cases, config, predictor_options)


def _out_of_fold(
    run_dir: Path, folds: list[Path], role: str, cases: dict[str, Case], config: Config, options: dict[str, Any]
) -> Selection:
    """Each fold's validation cases, by that fold's model."""
    if role != "val":
        raise SplitRecordError(
            f"{run_dir} holds {len(folds)} folds, and every case trains in all of them but one, so --split {role} "
            "names no model to predict with; use --split val (each case by the fold that held it out), "
            f"--checkpoint {run_dir}/fold-N for one fold's cases, or --cases ID ... (the ensemble of the folds)"
        )
    splits: list[tuple[Path, RecordedSplit]] = [(fold, read_split(fold)) for fold in folds]
    held_out: dict[str, Path] = {}
    for fold, split in splits:
        ids = split.cases("val")
        _known(ids, cases, config, str(split.path))
        for case in ids:
            if case in held_out:
                raise SplitRecordError(
                    f"case {case!r} is a validation case of both {held_out[case]} and {fold}; the folds are not "
                    f"one cross-validation (trained with different splits?); retrain them with --fold all"
                )
            held_out[case] = fold
    predictors = {fold: Predictor(fold, **options) for fold, _ in splits}
    check_members_agree(list(predictors.values()))
    order = sorted(held_out, key=natural_key)
    batch = [(_scan_of(cases[i]), predictors[held_out[i]]) for i in order]
    return Selection(batch, str(run_dir), f"the {len(order)} out-of-fold validation case(s) of {len(folds)} folds")
