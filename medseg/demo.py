"""The first-run demo: generate a sample study and show what medseg reads from it.

Later stages (training, the segment-study flow, the review page) plug in here as they
land; today the demo exercises the real ingestion path end to end: phantom files on
disk → discover → load → reference masks validated against their scans.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ScanError
from medseg.io import discover, load, load_label
from medseg.phantoms import CT_CLASSES, EM_CLASSES, write_sample_study

__all__ = ["run_demo"]


def run_demo(output: Path, seed: int = 0) -> dict[str, Any]:
    """Write the sample study under ``output`` and return (and save) what was read."""
    study = write_sample_study(output / "study", seed=seed)
    images = discover(study["images"])
    labels = {ref.id: ref for ref in discover(study["labels"]).scans}
    cases = []
    for ref in images.scans:
        scan = load(ref)
        classes = CT_CLASSES if ref.id.startswith("ct") else EM_CLASSES
        case: dict[str, Any] = {**scan.summary(), "reference": None}
        if ref.id in labels:
            try:
                label = load_label(labels[ref.id], scan, classes=list(classes.values()))
            except ScanError as exc:
                case["problems"].append(str(exc))
            else:
                names = {v: k for k, v in classes.items()}
                values, counts = np.unique(label.array, return_counts=True)
                case["reference"] = {
                    "path": str(label.ref.path),
                    "voxels": {names[int(v)]: int(c) for v, c in zip(values, counts)},
                }
        cases.append(case)
    summary = {
        "study": str(output / "study"),
        "cases": cases,
        "problems": [p.to_dict() for p in images.problems],
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"Sample study written to {summary['study']}", ""]
    header = f"{'case':<14}{'kind':<16}{'shape':<18}{'spacing (mm)':<30}{'orient':<8}reference mask"
    lines.append(header)
    lines.append("-" * len(header))
    for case in summary["cases"]:
        spacing = " x ".join(f"{s:.3g}" for s in case["spacing"])
        ref = case["reference"]
        shown = ", ".join(f"{k}={v}" for k, v in ref["voxels"].items()) if ref else "none"
        lines.append(f"{case['id']:<14}{case['kind']:<16}{str(tuple(case['shape'])):<18}{spacing:<30}{case['orientation']:<8}{shown}")
        lines.extend(f"  problem: {p}" for p in case["problems"])
    lines.append("")
    lines.append("Every scan loaded with its geometry and every reference mask matched its scan's grid.")
    return "\n".join(lines)
