"""Training cases from the three places users keep them, and their train/validation split.

A case is one image (one ScanRef per channel, nnU-Net's ``case_0000``/``case_0001``
convention) and its reference mask. Sources: a dataset id from data_manifest.csv, an
image folder with a label folder paired by case name, or a CSV of image,label paths.

A reference is a class map, or an instance map (``Case.instances``): one mask file per
object in the per-image layout (``CASE/images`` + ``CASE/masks``, found by ``discover``
in an image folder, or named in a CSV by the case folder or its masks/ folder), or a label
map file when ``data.labels_are`` is ``instances``. ``medseg.data.targets`` turns either
into the training target.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data import manifest
from medseg.config import DataConfig, SplitConfig
from medseg.errors import ConfigError
from medseg.ingest import (
    Discovery,
    LoadOptions,
    Scan,
    ScanRef,
    discover,
    load,
    load_label,
    ref_for_path,
    validate_label,
)

__all__ = ["Case", "find_cases", "load_case", "split_cases"]

_CHANNEL = re.compile(r"^(.*)_(\d{4})$")


@dataclass(frozen=True)
class Case:
    """One training/validation example: image channels and the reference mask."""

    id: str
    images: tuple[ScanRef, ...]
    label: ScanRef | None
    split: str = ""  # the manifest's split, when the source has one
    fold: int | None = None  # the manifest's fixed cross-validation fold, when it declares one
    instances: bool = False  # the label holds object ids (0: background), not class values


def load_case(
    case: Case, color: str = "grey", classes: Sequence[int] | None = None, ids: bool = False
) -> tuple[Scan, Scan | None]:
    """The case's image (its channels stacked in order, float32 when there are several) and its
    reference mask checked against it (one integer channel on the image's grid, values among
    ``classes`` when given); the mask is None for an unlabelled case.

    An instance case's mask holds class values too (its objects' class: the one non-zero
    value of ``classes``, 1 without them), unless ``ids``: then its object ids (0 background),
    which training needs to separate touching objects (``medseg.data.targets``).
    """
    options = LoadOptions(color=color)
    channels = [load(ref, options) for ref in case.images]
    scan = channels[0]
    if len(channels) > 1:
        scan.array = np.concatenate([c.array.astype(np.float32) for c in channels])
    if case.label is None:
        return scan, None
    if case.instances:
        label = load_label(case.label, scan)  # per-image masks are checked against the image's size
        if not ids:
            value = next((int(v) for v in classes if v != 0), 1) if classes is not None else 1
            label.array = np.where(label.array > 0, value, 0).astype(np.int32)
        return scan, label
    label = validate_label(load(case.label, LoadOptions(color="channels", palette="indices")), scan, classes)
    return scan, label


def find_cases(data: DataConfig) -> list[Case]:
    """All cases the config's data source names, sorted by id."""
    if data.dataset is not None:
        return _manifest_cases(data)
    instances = data.labels_are == "instances"
    if data.images is not None:
        return _folder_cases(data.images, data.labels, instances)
    if data.csv is not None:
        return _csv_cases(data.csv, instances)
    raise ConfigError("data: no data source; set data.dataset, data.images (+ data.labels) or data.csv")


def _manifest_cases(data: DataConfig) -> list[Case]:
    root = data.root or manifest.default_data_root()
    rows = [e for e in manifest.read_manifest() if e.dataset == data.dataset]
    splits = {e.case: e.split for e in rows}
    folds = {e.case: e.fold for e in rows if e.role == "image"}
    cases = []
    for entry in manifest.dataset_files(data.dataset, root):
        split = splits.get(entry.case, "")
        image = ScanRef(entry.case, _kind_of(entry.image), (entry.image,))
        label = ScanRef(entry.case, _kind_of(entry.label), (entry.label,)) if entry.label else None
        instances = data.labels_are == "instances"
        cases.append(Case(entry.case, (image,), label, split, folds.get(entry.case), instances))
    return cases


def _kind_of(path: Path) -> str:
    return ref_for_path(path).kind


def _folder_cases(images: Path, labels: Path | None, instances: bool) -> list[Case]:
    found = discover(images, stack_sequences=False)
    if found.problems:
        first = found.problems[0]
        raise ConfigError(
            f"data.images: {first.paths[0]}: {first.reason} ({len(found.problems)} bad input(s) in {images})"
        )
    if not found.scans:
        raise ConfigError(f"data.images: no scans found in {images}")
    channels: dict[str, list[tuple[int, ScanRef]]] = defaultdict(list)
    suffixed = all(_CHANNEL.match(ref.id) for ref in found.scans)
    label_refs: dict[str, ScanRef] = {}  # the per-image layout's own masks first
    for ref in found.scans:
        match = _CHANNEL.match(ref.id) if suffixed else None
        case_id, channel = (match.group(1), int(match.group(2))) if match else (ref.id, 0)
        channels[case_id].append((channel, ref))
        if ref.id in found.instance_masks:
            label_refs[case_id] = found.instance_masks[ref.id]
    if labels is not None and label_refs:
        raise ConfigError(
            f"data.labels: {images} holds its own instance masks (CASE/images + CASE/masks, e.g. case "
            f"{next(iter(label_refs))}); remove data.labels, or point data.images at the images alone"
        )
    if labels is not None:
        found_labels = discover(labels, stack_sequences=False)
        label_refs = {ref.id: ref for ref in found_labels.scans}
        if found_labels.problems:
            first = found_labels.problems[0]
            raise ConfigError(f"data.labels: {first.paths[0]}: {first.reason}")
        unpaired = sorted(set(label_refs) - set(channels))
        if unpaired:
            raise ConfigError(
                f"data.labels: {len(unpaired)} label(s) have no image with the same case name in {images} "
                f"(e.g. {unpaired[:3]}); image and label files must share their name (nnU-Net: case_0000 ↔ case)"
            )
    cases = []
    for case_id, refs in channels.items():
        refs.sort(key=lambda item: item[0])
        numbers = [n for n, _ in refs]
        if numbers != list(range(len(refs))):
            raise ConfigError(
                f"data.images: case {case_id} has channels {numbers}; expected _0000.._{len(refs) - 1:04d}"
            )
        label = label_refs.get(case_id)
        is_instances = label is not None and (instances or label.kind == "instance-masks")
        cases.append(Case(case_id, tuple(r for _, r in refs), label, instances=is_instances))
    return sorted(cases, key=lambda c: _natural(c.id))


def _layout_masks(path: Path) -> tuple[ScanRef, ScanRef | None] | None:
    """(image, instance masks) when ``path`` is a case folder of the per-image layout or its masks/ folder."""
    if not path.is_dir():
        return None
    case = path.parent if path.name.lower() == "masks" else path
    found: Discovery = discover(case)
    if len(found.scans) != 1 or not found.instance_masks:
        return None
    return found.scans[0], found.instance_masks.get(found.scans[0].id)


def _csv_cases(path: Path, instances: bool) -> list[Case]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"data.csv: cannot read {path} ({exc})") from None
    if not rows or "image" not in rows[0]:
        raise ConfigError(f"data.csv: {path} needs a header with columns image,label (and optionally case)")
    cases = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image = _csv_path(path, row.get("image", ""), line, "image")
        label_text = (row.get("label") or "").strip()
        label = _csv_path(path, label_text, line, "label") if label_text else None
        image_layout = _layout_masks(image)  # a case folder of the per-image layout: its image and masks
        image_ref = image_layout[0] if image_layout else ref_for_path(image)
        label_layout = _layout_masks(label) if label is not None else None
        if label_layout is not None:
            label_ref: ScanRef | None = label_layout[1]
        elif label is not None:
            label_ref = ref_for_path(label)
        else:
            label_ref = image_layout[1] if image_layout else None
        case_id = (row.get("case") or "").strip() or image_ref.id
        if case_id in seen:
            raise ConfigError(f"data.csv: {path}: line {line}: case {case_id!r} appears twice")
        seen.add(case_id)
        is_instances = label_ref is not None and (instances or label_ref.kind == "instance-masks")
        cases.append(Case(case_id, (image_ref,), label_ref, (row.get("split") or "").strip(), None, is_instances))
    return cases


def _csv_path(csv_path: Path, text: str, line: int, column: str) -> Path:
    if not text.strip():
        raise ConfigError(f"data.csv: {csv_path}: line {line}: empty {column} path")
    path = Path(text.strip()).expanduser()
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.exists():
        raise ConfigError(f"data.csv: {csv_path}: line {line}: {column} {path} does not exist")
    return path


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def split_cases(cases: Sequence[Case], split: SplitConfig) -> tuple[list[Case], list[Case]]:
    """(train, validation) cases as the split config says; unlabelled cases never train."""
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise ConfigError("data: no case has a label; training needs reference masks")
    by_id = {c.id: c for c in labelled}
    if split.mode == "manifest":
        train = [c for c in labelled if c.split == "train"]
        val = [c for c in labelled if c.split == "val"]
        if not train:
            raise ConfigError(
                "data.split.mode: 'manifest' needs cases whose split is 'train' "
                "(use a dataset from data_manifest.csv, or another mode)"
            )
        return train, val
    if split.mode == "cases":
        missing = [i for i in list(split.train or []) + list(split.val or []) if i not in by_id]
        if missing:
            raise ConfigError(f"data.split: unknown or unlabelled case ids {missing[:5]}; known: {sorted(by_id)[:10]}")
        return [by_id[i] for i in split.train or []], [by_id[i] for i in split.val or []]
    order = np.random.default_rng(split.seed).permutation(len(labelled))
    shuffled = [labelled[i] for i in order]
    if split.mode == "fraction":
        n_val = max(1, int(round(split.val_fraction * len(shuffled)))) if len(shuffled) > 1 else 0
        val_ids = {c.id for c in shuffled[:n_val]}
    elif all(c.fold is not None for c in labelled):  # kfold with the manifest's fixed folds
        declared = sorted({c.fold for c in labelled})
        if declared != list(range(split.folds)):
            raise ConfigError(
                f"data.split.folds: {split.folds}, but the manifest fixes folds {declared} for these "
                f"cases; set data.split.folds: {len(declared)}"
            )
        val_ids = {c.id for c in labelled if c.fold == split.fold}
    else:  # kfold drawn with split.seed
        if len(shuffled) < split.folds:
            raise ConfigError(
                f"data.split.folds: {split.folds} folds need at least {split.folds} labelled cases, "
                f"found {len(shuffled)}"
            )
        val_ids = {c.id for i, c in enumerate(shuffled) if i % split.folds == split.fold}
    return [c for c in labelled if c.id not in val_ids], [c for c in labelled if c.id in val_ids]
