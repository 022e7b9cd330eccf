"""Reading scans: one module per source kind, one ``load`` for all of them.

``discover(folder)`` finds ScanRefs; ``load(ref)`` returns a Scan (channel-first array +
Geometry in RAS+ mm); ``load_label(path, image)`` returns a validated reference mask.
Reading never modifies, moves or locks an input file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medseg.errors import ScanError
from medseg.geometry import check_geometry
from medseg.ingest.budget import BudgetError, check_budget, check_resample_budget
from medseg.ingest.discover import Discovery, case_id, discover
from medseg.ingest.dicom import load_dicom
from medseg.ingest.labels import load_instance_masks, load_label, validate_label
from medseg.ingest.microscopy import load_image, load_image_sequence, load_tiff
from medseg.ingest.nifti import load_nifti
from medseg.ingest.scan import LoadOptions, Problem, Scan, ScanKind, ScanRef

__all__ = [
    "BudgetError",
    "Discovery",
    "LoadOptions",
    "Problem",
    "READERS",
    "Scan",
    "ScanKind",
    "ScanRef",
    "case_id",
    "check_budget",
    "check_resample_budget",
    "discover",
    "load",
    "load_instance_masks",
    "load_label",
    "ref_for_path",
    "validate_label",
]

READERS: dict[str, Callable[[ScanRef, LoadOptions], Scan]] = {
    "dicom": load_dicom,
    "nifti": load_nifti,
    "tiff": load_tiff,
    "image": load_image,
    "image-sequence": load_image_sequence,
    "instance-masks": load_instance_masks,
}


def load(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """Read the scan ``ref`` names with the reader for its kind.

    Each reader refuses, from the header and before decoding, a scan over the memory budget
    (``options.memory_budget_mb``) and a grid that cannot be placed in space; the grid is
    checked once more here, so a reader that missed a case still cannot hand on a NaN or
    singular affine.
    """
    try:
        reader = READERS[ref.kind]
    except KeyError:
        raise ScanError(ref.paths, f"unknown scan kind {ref.kind!r}", f"use one of {sorted(READERS)}") from None
    try:
        scan = reader(ref, options)
    except MemoryError as exc:
        raise ScanError(
            ref.paths,
            "too large to load into memory (within the memory budget, but the memory ran out)",
            "free memory, lower the budget (--memory-budget MB) so such scans are refused up front, or split the scan",
        ) from exc
    except OverflowError as exc:  # a size or value in the header too large for the type it is stored in
        fix = "the header is corrupt; re-export the file"
        raise ScanError(ref.paths, f"a header value is out of range ({exc})", fix) from exc
    except PermissionError as exc:
        raise ScanError(
            ref.paths, f"permission denied ({exc.filename})", "make the file readable by this user"
        ) from exc
    check_geometry(ref.paths, scan.geometry.affine, scan.geometry.shape, f"the {ref.kind} reader's grid")
    return scan


def ref_for_path(path: Path) -> ScanRef:
    """The single scan at ``path`` (a file, a DICOM series folder or an image-sequence folder)."""
    found = discover(path)
    if len(found.scans) == 1:
        return found.scans[0]
    if found.problems:
        first = found.problems[0]
        raise ScanError(first.paths, first.reason, "fix or remove the file")
    if not found.scans:
        raise ScanError(path, "holds no scan medseg can read", "point at a DICOM series, NIfTI, TIFF or image file")
    raise ScanError(
        path,
        f"holds {len(found.scans)} scans ({', '.join(s.id for s in found.scans[:5])}), expected one",
        "point at a single scan",
    )
