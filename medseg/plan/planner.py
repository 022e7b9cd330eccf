"""From a fingerprint to a plan: the rules of ``medseg.plan.rules`` applied in order, as config sections.

A Plan is a tree of config keys whose leaves are :class:`~medseg.plan.rules.Choice` (a value and
its rule), so the same object gives the plain config (``as_dict``, validated by medseg.config)
and the commented YAML (``medseg.plan.writer``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.plan import rules
from medseg.plan.fingerprint import Fingerprint
from medseg.plan.memory import training_step_memory
from medseg.plan.rules import Choice

__all__ = ["DEFAULT_MEMORY_GB", "Plan", "PlanOptions", "make_plan"]

# What one training step may hold, counted in fp32 (mixed precision holds about half): enough for
# nnU-Net's 128^3 patch at batch 2 on a large isotropic CT, 8.3 GB by medseg.plan.memory's count.
DEFAULT_MEMORY_GB = 10.0
# A modality-less channel whose images reach this low (median over cases) holds Hounsfield units (air: -1000).
_HU_AIR = -500.0


@dataclass
class PlanOptions:
    """What the plan cannot learn from the data: its name, the source, where runs go, the budget."""

    name: str
    data: dict[str, Any]  # the data source keys (images + labels, csv, or dataset + root), paths absolute
    output_dir: Path
    color: str = "grey"
    memory_gb: float = DEFAULT_MEMORY_GB
    minutes: float | None = None
    declared_folds: Sequence[int] = ()


@dataclass
class Plan:
    """Config sections of Choices, plus what the YAML header tells a reader."""

    sections: dict[str, Any]
    summary: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The plain config (paths as strings), ready for ``medseg.config.config_from_dict``."""

        def plain(node: Any) -> Any:
            if isinstance(node, Choice):
                return str(node.value) if isinstance(node.value, Path) else node.value
            return {key: plain(value) for key, value in node.items()}

        return plain(self.sections)

    def override(self, values: Mapping[str, Any], rule: str = "set on the command line (--set)") -> None:
        """Replace planned values by ``values`` (nested like the config, as ``apply_overrides`` builds them)."""

        def merge(node: dict[str, Any], given: Mapping[str, Any]) -> None:
            for key, value in given.items():
                if isinstance(node.get(key), dict) and isinstance(value, Mapping):
                    merge(node[key], value)
                else:
                    node[key] = Choice(value, rule)

        merge(self.sections, values)


def _x(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def _summary(fp: Fingerprint, median_shape: Sequence[float], spacing: Sequence[float] | None) -> list[str]:
    cases = fp.cases
    lines = [
        f"{len(cases)} labelled case(s) from {fp.source}"
        + (f" ({len(fp.unlabelled)} without a label, not measured)" if fp.unlabelled else ""),
        "modality per channel: " + ", ".join(m or "unknown (no header names it)" for m in fp.modalities),
        f"median shape at the target spacing: {_x(median_shape)} voxels"
        + (f", spacing {_x(spacing)} mm" if spacing else " (pixel grid kept)"),
    ]
    for channel, stats in enumerate(fp.intensity):
        lines.append(
            f"channel {channel} foreground intensities: mean {stats.mean:.4g}, std {stats.std:.4g}, "
            f"0.5-99.5 percentiles {stats.p00_5:.4g} to {stats.p99_5:.4g} ({stats.samples} voxels sampled)"
        )
    for cls in fp.classes:
        line = f"label {cls.value}: {100 * cls.voxel_fraction:.3g}% of the voxels, in {cls.cases} case(s)"
        if cls.value != 0 and cls.object_voxels:
            line += (
                f", {cls.objects_per_case:g} object(s) per case, median object {cls.object_voxels[1]:.4g} voxels "
                f"(5th-95th percentile {cls.object_voxels[0]:.4g}-{cls.object_voxels[2]:.4g})"
            )
        lines.append(line)
    return lines


def _notes(fp: Fingerprint) -> list[str]:
    notes = []
    for channel, modality in enumerate(fp.modalities):
        lows = [c.image_range[channel][0] for c in fp.cases]
        if not modality and float(np.median(lows)) <= _HU_AIR:
            notes.append(
                f"channel {channel} has no modality in its headers but reaches {np.median(lows):.4g} (air in "
                "Hounsfield units?); if it is CT, plan again with --modality CT for CT normalisation"
            )
    return notes


def make_plan(fp: Fingerprint, options: PlanOptions) -> Plan:
    """Apply the rules to the fingerprint; the result validates as a medseg config."""
    cases = fp.cases
    volumes = fp.spatial_dims == 3
    if volumes and any(len(c.shape) != 3 for c in cases):
        flat = next(c for c in cases if len(c.shape) != 3)
        raise ConfigError(f"case {flat.id} is a 2D image but other cases are volumes; plan 2D and 3D data apart")
    shapes = [c.shape if volumes else c.shape[:2] for c in cases]
    spacings = [c.spacing if volumes else c.spacing[:2] for c in cases]
    physical = volumes and all(c.spacing_known for c in cases)
    orient = (
        rules.orientation([c.orientation for c in cases])
        if physical
        else Choice(None, "no reorientation: 2D images, or files without a physical voxel size")
    )
    grid_shapes, grid_spacings = rules.grids_in(shapes, spacings, [c.orientation for c in cases], orient.value)
    if physical:
        spacing = rules.target_spacing(grid_spacings, grid_shapes)
        at_target = rules.resampled_shapes(grid_shapes, grid_spacings, spacing.value)
    else:
        spacing = Choice(None, "no resampling: 2D images, or files without a physical voxel size keep their grid")
        at_target = grid_shapes
    rule_spacing = spacing.value or [1.0] * grid_shapes.shape[1]
    median_shape = [float(v) for v in np.median(at_target, axis=0)]
    dims = rules.dimensionality(volumes, rule_spacing, median_shape)
    spatial_dims, slice_axis = dims.value
    in_plane = [a for a in range(len(median_shape)) if a != slice_axis]
    patch_median = [median_shape[a] for a in in_plane] if slice_axis is not None else median_shape
    patch_spacing = [rule_spacing[a] for a in in_plane] if slice_axis is not None else rule_spacing
    features, max_features = rules.width(spatial_dims, options.minutes)
    model = {
        "name": "unet",
        "spatial_dims": spatial_dims,
        "in_channels": fp.channels,
        "out_channels": len(fp.label_values),
        "features": features.value,
        "options": {"norm": "instance", "dropout": 0.0, "max_features": max_features.value},
    }
    budget = int(options.memory_gb * 1e9)
    patch, depth, memory = rules.fit_patch(
        patch_median, patch_spacing, lambda p, d: training_step_memory({**model, "depth": d}, p), budget
    )
    dataset_voxels = float(np.prod(median_shape)) * len(cases)
    batch = rules.batch_size(memory, budget, patch.value, dataset_voxels)
    norm = rules.norm_layer(batch.value)
    normalisation = rules.normalisation(fp.modalities, fp.intensity)
    intensity, stats = normalisation.value

    data: dict[str, Any] = {
        key: Choice(value, "where the cases come from") for key, value in options.data.items() if value is not None
    }
    data["classes"] = rules.class_names(fp.label_values)
    if options.color != "grey":
        data["color"] = Choice(options.color, "colour images as channels (--color)")
    data["split"] = rules.split(len(cases), options.declared_folds)
    preprocess: dict[str, Any] = {"intensity": Choice(intensity, normalisation.rule)}
    if stats:
        preprocess["channel_stats"] = Choice(stats, "per channel, from the fingerprint's foreground sample")
    if orient.value:
        preprocess["orientation"] = orient
    if spacing.value:
        preprocess["spacing"] = spacing
    train: dict[str, Any] = {"patch_size": patch, "batch_size": batch}
    if slice_axis is not None:
        train["slice_axis"] = Choice(slice_axis, dims.rule)
    train["loss"] = rules.loss()
    train.update(rules.recipe(options.minutes))
    sections: dict[str, Any] = {
        "name": Choice(options.name, "the run folder's name under output_dir"),
        "data": data,
        "preprocess": preprocess,
        "model": {
            "name": Choice("unet", "U-Net, the architecture nnU-Net configures"),
            "spatial_dims": Choice(spatial_dims, dims.rule),
            "in_channels": Choice(fp.channels, "the channels of every case"),
            "out_channels": Choice(len(fp.label_values), "one output per label value"),
            "features": features,
            "depth": depth,
            "options": {
                "norm": norm,
                "dropout": Choice(0.0, "no dropout (nnU-Net): augmentation regularises"),
                "max_features": max_features,
            },
        },
        "augment": rules.augmentation(spatial_dims),
        "train": train,
        "infer": rules.sliding_window(patch.value, batch.value),
        "output_dir": Choice(options.output_dir, "where run folders go"),
    }
    return Plan(sections, _summary(fp, median_shape, spacing.value), _notes(fp))
