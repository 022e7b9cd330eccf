"""What medseg will see in a folder: the scans, their geometry, and every problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import ScanError
from medseg.ingest import LoadOptions, discover, load

__all__ = ["inspect_path", "format_report"]


def inspect_path(path: Path, options: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """Discover and fully load every scan under ``path``; a scan that fails to load is
    listed with its problem instead of stopping the listing. A scan of the per-image
    instance layout lists its masks (folder and count) under ``instance_masks``; they are
    counted, not loaded (training loads and checks them)."""
    found = discover(path)
    scans = []
    for ref in found.scans:
        try:
            scans.append(load(ref, options).summary())
        except ScanError as exc:
            scans.append(
                {"id": ref.id, "kind": ref.kind, "path": str(ref.path), "files": len(ref.paths), "problems": [str(exc)]}
            )
        masks = found.instance_masks.get(ref.id)
        if masks is not None:
            scans[-1]["instance_masks"] = {"folder": str(masks.paths[0].parent), "files": len(masks.paths)}
    return {
        "root": str(found.root),
        "scans": scans,
        "problems": [p.to_dict() for p in found.problems],
        "skipped": [p.to_dict() for p in found.skipped],
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable listing of ``inspect_path``'s result."""
    lines = [
        f"{report['root']}: {len(report['scans'])} scan(s), {len(report['problems'])} problem(s), "
        f"{len(report['skipped'])} skipped"
    ]
    for scan in report["scans"]:
        lines.append("")
        lines.append(f"{scan['id']}  [{scan['kind']}, {scan['files']} file(s)]  {scan['path']}")
        if "instance_masks" in scan:
            masks = scan["instance_masks"]
            lines.append(f"  instance labels: {masks['files']} mask file(s) in {masks['folder']}, one object per file")
        if "shape" not in scan:
            lines.extend(f"  PROBLEM: {p}" for p in scan["problems"])
            continue
        spacing = " x ".join(f"{s:.4g}" for s in scan["spacing"])
        unit = "mm" if scan["spacing_known"] else "(pixel size unknown)"
        lines.append(
            f"  shape {tuple(scan['shape'])} x {scan['channels']} channel(s), {scan['dtype']}, "
            f"spacing {spacing} {unit}, orientation {scan['orientation']}, modality {scan['modality'] or '-'}"
        )
        if scan.get("series_description"):
            lines.append(f"  description: {scan['series_description']}")
        lines.append("  affine (voxel -> RAS mm):")
        lines.extend("    [" + "  ".join(f"{v:11.5g}" for v in row) + "]" for row in scan["affine"])
        lines.extend(f"  note: {n}" for n in scan["notes"])
    if report["problems"]:
        lines.append("")
        lines.append("Problems (not loaded):")
        for problem in report["problems"]:
            shown = ", ".join(problem["paths"][:3]) + (
                f" (+{len(problem['paths']) - 3} files)" if len(problem["paths"]) > 3 else ""
            )
            lines.append(f"  {shown}: {problem['reason']}")
    if report["skipped"]:
        lines.append("")
        lines.append("Skipped (not scans):")
        lines.extend(f"  {p['paths'][0]}: {p['reason']}" for p in report["skipped"])
    return "\n".join(lines)
