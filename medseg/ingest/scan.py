"""What discovery finds (ScanRef) and what loading returns (Scan)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import ConfigError
from medseg.geometry import Geometry

__all__ = ["ScanKind", "ScanRef", "Scan", "Problem", "LoadOptions"]

# instance-masks: one binary mask file per object of one image (a reference, never a scan to segment).
ScanKind = Literal["dicom", "nifti", "tiff", "image", "image-sequence", "instance-masks"]


@dataclass(frozen=True)
class ScanRef:
    """A scan found on disk: its files in reading order, its kind and a stable id.

    ``id`` is the path relative to the discovered folder (without suffix), so masks and
    reports can mirror the input tree and be paired with reference masks by id.
    """

    id: str
    kind: ScanKind
    paths: tuple[Path, ...]

    @property
    def path(self) -> Path:
        """The file (or, for a DICOM series or image sequence, the folder) a person knows."""
        if self.kind in ("dicom", "image-sequence", "instance-masks") and len(self.paths) > 1:
            return self.paths[0].parent
        return self.paths[0]


@dataclass(frozen=True)
class Problem:
    """A scan (or file) that could not be used, and why; reported, never fatal to a batch."""

    paths: tuple[Path, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"paths": [str(p) for p in self.paths], "reason": self.reason}


@dataclass(frozen=True)
class LoadOptions:
    """How to turn file contents into arrays.

    color: 'grey' averages RGB(A) to one luminance channel; 'channels' keeps R, G, B as
    channels (alpha is dropped either way, with a note). palette: a palette ('P') image
    becomes RGB, or keeps its indices as values (masks saved with a colour palette).
    memory_budget_mb: the most one scan may take once decoded, in MB (10^6 bytes), checked
    from its header before decoding (``medseg.ingest.budget``); None: a quarter of the
    available memory, at most 4096 MB.
    """

    color: Literal["grey", "channels"] = "grey"
    palette: Literal["rgb", "indices"] = "rgb"
    memory_budget_mb: float | None = None

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0
        ):
            raise ConfigError(
                f"memory_budget_mb must be a positive number of megabytes (or unset for the default), got {budget!r}"
            )


@dataclass
class Scan:
    """A loaded scan: channel-first array plus the geometry of its spatial axes.

    ``array`` has shape (C, *geometry.shape). ``metadata`` is JSON-ready source
    information (for DICOM: the UIDs a DICOM SEG must reference, in slice order).
    """

    ref: ScanRef
    array: np.ndarray
    geometry: Geometry
    modality: str
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.shape[1:] != self.geometry.shape:
            raise ValueError(
                f"{self.ref.path}: array shape {self.array.shape} does not match "
                f"geometry shape {self.geometry.shape} (expected channel-first)"
            )

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the scan (what `medseg info --json` prints)."""
        return {
            "id": self.ref.id,
            "kind": self.ref.kind,
            "path": str(self.ref.path),
            "files": len(self.ref.paths),
            "modality": self.modality,
            "series_description": self.metadata.get("series_description", ""),
            "channels": self.channels,
            "dtype": str(self.array.dtype),
            "intensity_range": [float(np.min(self.array)), float(np.max(self.array))] if self.array.size else [],
            **self.geometry.to_dict(),
            "notes": list(self.notes) + list(self.geometry.notes),
            "problems": [],
        }
