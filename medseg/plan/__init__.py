"""`medseg plan`: measure a labelled dataset (the fingerprint) and derive a config from it (the plan).

nnU-Net's central idea, that spacing, patch, depth, batch and normalisation follow from the
data, done in the open: the plan is an ordinary medseg config whose every value carries the
rule that chose it, and the fingerprint it came from is written beside it as JSON.

    planned = plan_dataset(DataConfig(images=..., labels=...), PlanOptions(name=..., ...))
    write_plan(planned, Path("configs/mine.yaml"))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from medseg.config import Config, DataConfig, apply_overrides, config_from_dict, load_yaml
from medseg.files import atomic_write_text, tidy_journal
from medseg.plan.fingerprint import Fingerprint, fingerprint_cases
from medseg.plan.planner import DEFAULT_MEMORY_GB, Plan, PlanOptions, make_plan
from medseg.plan.rules import Choice
from medseg.plan.writer import plan_yaml

__all__ = [
    "DEFAULT_MEMORY_GB",
    "Fingerprint",
    "Plan",
    "PlanOptions",
    "Planned",
    "fingerprint_path_for",
    "make_plan",
    "plan_dataset",
    "plan_yaml",
    "write_plan",
]

# Config keys that hold paths: a relative path given with --set is relative to the current folder.
_PATH_KEYS = (("data", "images"), ("data", "labels"), ("data", "csv"), ("data", "root"), ("output_dir",))


@dataclass
class Planned:
    """A plan, the fingerprint it follows from, and the validated config it is."""

    plan: Plan
    fingerprint: Fingerprint
    config: Config


def plan_dataset(
    data: DataConfig,
    options: PlanOptions,
    modality: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    progress: bool | None = None,
) -> Planned:
    """Fingerprint the cases ``data`` names (as training would read them) and plan a config for them.

    ``overrides`` (``KEY=VALUE``, as ``--set``) replace planned values; the result is validated
    by medseg.config, so a plan that would not train is refused here.
    """
    from medseg.data.datasets import find_cases

    cases = find_cases(data)
    source = str(data.images or data.csv or f"dataset {data.dataset}")
    labelled = [c for c in cases if c.label is not None]
    if labelled and all(c.fold is not None for c in labelled):
        options = replace(options, declared_folds=[int(c.fold) for c in labelled])
    fingerprint = fingerprint_cases(cases, source, options.color, modality, progress=progress)
    plan = make_plan(fingerprint, options)
    if overrides:
        plan.override(apply_overrides({}, overrides))
    config = config_from_dict(plan.as_dict(), base_dir=Path.cwd(), source="the plan (with --set)")
    for keys in _PATH_KEYS:  # the resolved paths, which the writer makes relative to the config's folder
        node, value = plan.sections, config
        for key in keys[:-1]:
            node, value = node.get(key, {}), getattr(value, key)
        if isinstance(node.get(keys[-1]), Choice):
            node[keys[-1]] = Choice(Path(getattr(value, keys[-1])), node[keys[-1]].rule)
    return Planned(plan, fingerprint, config)


def fingerprint_path_for(config_path: Path) -> Path:
    """Where the fingerprint goes: beside the config, ``NAME.fingerprint.json`` for ``NAME.yaml``."""
    return config_path.with_name(f"{config_path.stem}.fingerprint.json")


def write_plan(planned: Planned, config_path: Path, fingerprint_path: Path | None = None, command: str = "") -> Path:
    """Write the commented YAML and the fingerprint JSON (atomically), after checking that the YAML
    loads back to exactly the planned config."""
    fingerprint_path = fingerprint_path or fingerprint_path_for(config_path)
    folder = config_path.absolute().parent
    text = plan_yaml(planned.plan, folder, fingerprint_path.name, command or "medseg plan")
    reread = config_from_dict(load_yaml(text), base_dir=folder, source=str(config_path))
    if reread.dump() != planned.config.dump():  # a bug in the writer, never the user's doing
        raise RuntimeError(f"the plan written as YAML does not read back as planned: {config_path}")
    atomic_write_text(fingerprint_path, json.dumps(planned.fingerprint.to_dict(), indent=1) + "\n")
    atomic_write_text(config_path, text)
    for written in {config_path.parent, fingerprint_path.parent}:
        tidy_journal(written)
    return config_path
