"""Score predicted masks against reference masks, case by case (reports: `medseg.evaluation.reports`).

Masks are paired by case id (the ScanRef id that ``discover`` gives each file, i.e. its
path below the folder without suffix). Per case and class: Dice, IoU and optionally
HD95 and surface Dice (MONAI, in mm of the reference grid); per case: pixel accuracy.

Empty classes (see ``CONVENTIONS``, also shown by ``medseg evaluate --help``):
a class absent from both masks scores NaN on every metric and drops out of the
summaries; a class present in only one scores Dice = IoU = surface Dice = 0 and
HD95 = inf, so a missed structure stays visible (the HD95 mean becomes inf; median
and n stay usable).

Reports in the output folder, each written to a temporary file and renamed:

- ``metrics.csv``: columns case, class, statistic, dice, iou, [hd95], [surface_dice],
  pixel_accuracy. Per-case rows have an empty statistic and repeat the case's pixel
  accuracy on each class row; summary rows have an empty case and statistic mean, std,
  median or n, with pixel accuracy on its own row with an empty class. NaN is ``nan``.
- ``metrics.json``: classes, cases, summary, failures and unpaired ids. Strict JSON
  has no NaN or infinity, so NaN is written as null and inf as the string "inf".

A prediction whose grid holds the reference's voxel centres in another axis order (LPS
vs LAS) is transposed/flipped onto the reference grid exactly; with ``resample="nearest"``
any other grid is resampled onto it (``medseg.evaluation.grids``); each case records which in
``grid`` and its notes. A pair that cannot be scored (unreadable file, different grids,
RGB mask) becomes a failure with its reason; the other cases go on.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.constants import CONVENTIONS
from medseg.errors import ConfigError, LabelError, MedsegError, ScanError
from medseg.evaluation.grids import RESAMPLE_MODES, align_to_reference
from medseg.evaluation.metrics import (
    ISBI_THRESHOLDS,
    isbi_counts,
    isbi_pixel_error,
    class_overlap,
    hausdorff95,
    pixel_accuracy,
    summarize,
    surface_dice,
)
from medseg.files import natural_key
from medseg.ingest import (
    Discovery,
    LoadOptions,
    Scan,
    ScanRef,
    discover,
    load,
    validate_label,
)
from medseg.ingest.sniff import suffix_of

__all__ = [
    "EvaluationReport",
    "Failure",
    "evaluate_case",
    "evaluate_folders",
    "parse_classes",
    "read_prediction_classes",
]

MASK_OPTIONS = LoadOptions(color="channels", palette="indices")
SUMMARY_STATISTICS = ("mean", "std", "median", "n")


@dataclass(frozen=True)
class Failure:
    """A case that could not be scored, the files involved and why."""

    case: str
    paths: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "paths": list(self.paths), "reason": self.reason}


@dataclass
class EvaluationReport:
    """Everything one evaluation found: scored cases, failures and unpaired masks.

    ``cases`` holds one dict per case as ``evaluate_case`` returns it, with every class
    of ``classes`` present (NaN rows where a class is absent from both masks).
    """

    pred_dir: Path
    ref_dir: Path
    classes: dict[str, int]
    classes_source: str
    metrics: tuple[str, ...]
    surface_mm: float | None = None
    resample: str | None = None
    isbi: bool = False
    cases: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    unpaired_predictions: list[str] = field(default_factory=list)
    unpaired_references: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        """Per class and metric: mean, std, median and n over the cases where it is defined."""
        per_class = {
            name: {m: summarize([c["classes"][name][m] for c in self.cases]) for m in self.metrics}
            for name in self.classes
        }
        summary = {"classes": per_class, "pixel_accuracy": summarize([c["pixel_accuracy"] for c in self.cases])}
        if self.isbi:  # pooled over every case's pixels, as the challenge pools its slices
            pooled = sum((np.asarray(c["isbi_counts"]) for c in self.cases), np.zeros((len(ISBI_THRESHOLDS), 3)))
            summary["isbi_pixel_error"] = isbi_pixel_error(pooled)[0] if self.cases else math.nan
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "prediction_folder": str(self.pred_dir),
            "reference_folder": str(self.ref_dir),
            "classes": dict(self.classes),
            "classes_source": self.classes_source,
            "metrics": list(self.metrics),
            "surface_dice_tolerance_mm": self.surface_mm,
            "resample": self.resample,
            "resampled_cases": [c["case"] for c in self.cases if c.get("grid") == "resampled"],
            "conventions": " ".join(CONVENTIONS.split()),
            "cases": self.cases,
            "summary": self.summary,
            "failures": [f.to_dict() for f in self.failures],
            "unpaired_predictions": list(self.unpaired_predictions),
            "unpaired_references": list(self.unpaired_references),
        }


def parse_classes(text: str) -> dict[str, int]:
    """``membrane=0,cell=255`` → {"membrane": 0, "cell": 255}; ConfigError on bad input."""
    classes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not name or not re.fullmatch(r"-?\d+", value):
            raise ConfigError(f"--classes: {item!r} is not NAME=VALUE; write e.g. --classes background=0,liver=1")
        if name in classes:
            raise ConfigError(f"--classes: class {name!r} is named twice; give each class one value")
        classes[name] = int(value)
    if not classes:
        raise ConfigError("--classes is empty; write e.g. --classes background=0,liver=1")
    _check_unique_values(classes, "--classes")
    return classes


def read_prediction_classes(pred_dir: Path) -> dict[str, int] | None:
    """Class names and values from ``predictions.json`` (written by `medseg predict`), if any."""
    path = Path(pred_dir) / "predictions.json"
    if not path.is_file():
        return None
    fix = 'it must hold {"classes": {"name": value, ...}}; fix it, or pass --classes NAME=VALUE,...'
    try:
        declared = json.loads(path.read_text()).get("classes")
    except (OSError, ValueError, AttributeError) as exc:
        raise ScanError(path, f"cannot read class names ({exc})", fix) from exc
    if isinstance(declared, list):  # names in value order
        declared = {str(name): i for i, name in enumerate(declared)}
    if (
        not isinstance(declared, dict)
        or not declared
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in declared.values())
    ):
        raise ScanError(path, f'"classes" is {declared!r}, not a mapping of names to integer values', fix)
    classes = {str(k): int(v) for k, v in declared.items()}
    _check_unique_values(classes, str(path))
    return classes


def evaluate_case(
    pred: Scan,
    ref: Scan,
    classes: Mapping[str, int] | None = None,
    hd95: bool = False,
    surface_mm: float | None = None,
    resample: str | None = None,
    isbi: bool = False,
) -> dict[str, Any]:
    """Scores of one prediction against its reference; LabelError if they cannot be compared.

    classes: name → value; None scores every value found in either mask as ``label_<value>``.
    resample: None scores only grids holding the reference's voxel centres (in any axis order);
    "nearest" resamples any other prediction grid onto the reference grid.
    Returns {"case", "prediction", "reference", "grid" ("same", "reoriented" or "resampled"),
    "pixel_accuracy", "classes": {name: {"value", "dice", "iou", ["hd95"], ["surface_dice"]}},
    "distance_unit" (with distances), ["isbi_counts", "isbi_pixel_error"] (with isbi), "notes"}.
    isbi: also the ISBI 2012 challenge's pixel error (`isbi_pixel_error`): reference values
    above 0 are positive, and so are the prediction's non-zero values.
    """
    aligned = align_to_reference(validate_label(pred, pred), ref, resample)
    p, r = aligned.array, validate_label(ref, ref).array[0]
    found = sorted(int(v) for v in np.union1d(np.unique(p), np.unique(r)))
    notes: list[str] = [aligned.note] if aligned.note else []
    if classes is None:
        classes = {f"label_{v}": v for v in found}
    else:
        known = set(classes.values())
        stray = [v for v in found if v not in known]
        if stray:
            notes.append(f"values {stray} belong to no class {dict(classes)}; they count in pixel accuracy only")
    overlap = class_overlap(p, r, list(classes.values()))
    distances = hd95 or surface_mm is not None
    spacing = list(ref.geometry.spacing) if ref.geometry.spacing_known else [1.0] * p.ndim
    scores: dict[str, dict[str, Any]] = {}
    for name, value in classes.items():
        dice, iou = overlap[int(value)]
        row: dict[str, Any] = {"value": int(value), "dice": dice, "iou": iou}
        if distances:
            in_pred, in_ref = p == value, r == value
            if hd95:
                row["hd95"] = hausdorff95(in_pred, in_ref, spacing)
            if surface_mm is not None:
                row["surface_dice"] = surface_dice(in_pred, in_ref, spacing, surface_mm)
        scores[name] = row
    result: dict[str, Any] = {
        "case": ref.ref.id,
        "prediction": str(pred.ref.path),
        "reference": str(ref.ref.path),
        "grid": aligned.method,
        "pixel_accuracy": pixel_accuracy(p, r),
        "classes": scores,
    }
    if isbi:
        counts = isbi_counts((p != 0).astype(np.float32), r)
        result["isbi_counts"] = counts.tolist()
        result["isbi_pixel_error"] = isbi_pixel_error(counts)[0]
    if distances:
        result["distance_unit"] = "mm" if ref.geometry.spacing_known else "pixel"
        if not ref.geometry.spacing_known:
            notes.append("the reference has no physical pixel size: HD95 and surface Dice are in pixels")
    result["notes"] = notes
    return result


def evaluate_folders(
    pred_dir: Path | str,
    ref_dir: Path | str,
    classes: Mapping[str, int] | None = None,
    hd95: bool = False,
    surface_mm: float | None = None,
    stack_sequences: bool = True,
    progress: bool | None = None,
    resample: str | None = None,
    isbi: bool = False,
) -> EvaluationReport:
    """Score every prediction in ``pred_dir`` that has a reference with the same case id.

    classes: name → value; else ``predictions.json`` in pred_dir; else every value found.
    resample: "nearest" resamples a prediction on another grid onto its reference's grid
    (see ``evaluate_case``); None refuses such a pair as a failure naming the offset.
    stack_sequences: numbered 2D images in one folder form one 3D case, as `medseg predict`
    reads them; False scores each image as a case of its own.
    isbi: also the ISBI 2012 challenge's pixel error, per case and pooled over all cases as
    the challenge pools its slices (``report.summary["isbi_pixel_error"]``).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    if surface_mm is not None and not (math.isfinite(surface_mm) and surface_mm >= 0):
        raise ConfigError(f"surface Dice tolerance {surface_mm} mm must be a finite number >= 0, e.g. 1.0")
    if resample is not None and resample not in RESAMPLE_MODES:
        raise ConfigError(f"resample {resample!r} is not one of {', '.join(RESAMPLE_MODES)}; e.g. --resample nearest")
    preds, refs = discover(pred_dir, stack_sequences), discover(ref_dir, stack_sequences)
    if classes is not None:
        mapping, source = dict(classes), "given"
        _check_unique_values(mapping, "classes")
    else:
        mapping = read_prediction_classes(pred_dir)
        source = "predictions.json" if mapping is not None else "values found"
    metrics = ("dice", "iou") + (("hd95",) if hd95 else ()) + (("surface_dice",) if surface_mm is not None else ())
    report = EvaluationReport(pred_dir, ref_dir, dict(mapping or {}), source, metrics, surface_mm, resample, isbi)
    pairs = _pair(preds, refs, report)
    if not pairs and not report.failures:
        raise ScanError(
            [pred_dir, ref_dir],
            "no prediction has a reference with the same case id "
            f"(predictions: {_examples(report.unpaired_predictions)}; "
            f"references: {_examples(report.unpaired_references)})",
            "name each mask after its case in both folders (as `medseg predict` does), e.g. pred/case_01.nii.gz "
            "and ref/case_01.nii.gz",
        )
    show = progress if progress is not None else sys.stderr.isatty()
    for pred_ref, ref_ref in tqdm(pairs, desc="evaluate", unit="case", disable=not show):
        try:
            pred, ref = _load_mask(pred_ref, "prediction"), _load_mask(ref_ref, "reference")
            report.cases.append(evaluate_case(pred, ref, mapping, hd95, surface_mm, resample, isbi))
        except MedsegError as exc:
            report.failures.append(Failure(ref_ref.id, _shown(pred_ref, ref_ref), str(exc)))
        except (OSError, ValueError, RuntimeError) as exc:  # anything else a file can provoke
            report.failures.append(Failure(ref_ref.id, _shown(pred_ref, ref_ref), f"{type(exc).__name__}: {exc}"))
    if mapping is None:
        report.classes = _union_of_found_classes(report.cases, metrics)
    report.failures.sort(key=lambda f: natural_key(f.case))
    return report


def _load_mask(ref: ScanRef, role: str) -> Scan:
    try:
        return load(ref, MASK_OPTIONS)
    except ScanError as exc:
        raise LabelError(exc.paths, f"{role} mask unreadable: {exc.problem}", exc.fix) from exc


def _pair(preds: Discovery, refs: Discovery, report: EvaluationReport) -> list[tuple[ScanRef, ScanRef]]:
    """Pairs by case id; unreadable files become failures, lonely masks are listed."""
    pred_by_id = {s.id: s for s in preds.scans}
    ref_by_id = {s.id: s for s in refs.scans}
    failed: set[str] = set()
    for role, found in (("prediction", preds), ("reference", refs)):
        for problem in found.problems:
            case = _problem_id(problem.paths[0], found.root)
            failed.add(case)
            reason = f"{role} {problem.paths[0]}: {problem.reason}"
            report.failures.append(Failure(case, tuple(str(p) for p in problem.paths), reason))
    pairs = []
    for case in sorted(set(pred_by_id) | set(ref_by_id), key=natural_key):
        if case in failed:
            continue  # its other mask is accounted for by the failure
        if case in pred_by_id and case in ref_by_id:
            pairs.append((pred_by_id[case], ref_by_id[case]))
        elif case in pred_by_id:
            report.unpaired_predictions.append(case)
        else:
            report.unpaired_references.append(case)
    return pairs


def _problem_id(path: Path, root: Path) -> str:
    """The case id a file would have had, so an unreadable mask is reported by its case."""
    base = root.parent if root.is_file() else root
    try:
        rel = path.relative_to(base).as_posix()
    except ValueError:
        rel = path.name
    suffix = suffix_of(path)
    return rel[: -len(suffix)] if suffix and rel.lower().endswith(suffix) else rel


def _union_of_found_classes(cases: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, int]:
    """``label_<v>`` for every value seen in any case; cases lacking one get NaN rows."""
    values = sorted({row["value"] for case in cases for row in case["classes"].values()})
    classes = {f"label_{v}": v for v in values}
    for case in cases:
        rows = case["classes"]
        case["classes"] = {
            name: rows.get(name) or {"value": v, **{m: float("nan") for m in metrics}} for name, v in classes.items()
        }
    return classes


def _check_unique_values(classes: Mapping[str, int], source: str) -> None:
    seen: dict[int, str] = {}
    for name, value in classes.items():
        if value in seen:
            raise ConfigError(
                f"{source}: classes {seen[value]!r} and {name!r} share the value {value}; give each its own"
            )
        seen[value] = name


def _shown(*refs: ScanRef) -> tuple[str, ...]:
    return tuple(str(r.path) for r in refs)


def _examples(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "") if ids else "none"
