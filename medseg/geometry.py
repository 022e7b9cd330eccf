"""The one geometry object that travels with every scan and every mask.

World convention: nibabel's RAS+ in millimetres. ``affine @ (i, j, k, 1)`` gives the
world position of the centre of voxel ``array[..., i, j, k]``, where the array is channel
first and its spatial axes are in affine order (for DICOM: column, row, slice; for
microscopy: x, y, z). DICOM's LPS is converted once, at reading, by ``lps_to_ras``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import nibabel as nib
import numpy as np

__all__ = ["Geometry", "LPS_TO_RAS", "lps_to_ras"]

# Flipping the first two world axes turns DICOM's LPS into RAS (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel→LPS affine into a voxel→RAS affine."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a scan: spatial shape plus the 4x4 voxel→RAS affine.

    ``spacing_known`` is False where the file carried no physical pixel size (a plain PNG):
    such a grid matches any other grid of the same shape.
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    spacing_known: bool = True
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"an affine must be 4x4, got {affine.shape}")
        if len(self.shape) not in (2, 3):
            raise ValueError(f"a scan has 2 or 3 spatial dimensions, got shape {self.shape}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_spacing(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float],
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        spacing_known: bool = True,
    ) -> "Geometry":
        """An axis-aligned grid (microscopy, phantoms): diagonal spacing, given origin."""
        steps = list(spacing) + [1.0] * (3 - len(spacing))
        affine = np.diag(steps + [1.0])
        affine[:3, 3] = origin
        return cls(affine, tuple(shape), spacing_known=spacing_known)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis of the array."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(n) for n in norms[: self.ndim])

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world directions of the array axes."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return self.affine[:3, :3] / np.where(norms == 0, 1.0, norms)

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as 'RAS' or 'LPS': where each array axis points in the world."""
        codes = nib.aff2axcodes(self.affine)
        return "".join(c or "?" for c in codes[: max(self.ndim, 3)])

    def world(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """World (RAS mm) coordinates of voxel indices, shape (..., ndim) → (..., 3)."""
        idx = np.asarray(index, dtype=np.float64)
        pad = np.zeros(idx.shape[:-1] + (4 - idx.shape[-1],))
        pad[..., -1] = 1.0
        homogeneous = np.concatenate([idx, pad], axis=-1)
        return homogeneous @ self.affine.T[:, :3]

    def corners(self) -> np.ndarray:
        """World coordinates of the grid's corner voxel centres (2**ndim, 3)."""
        grids = np.meshgrid(*[[0, s - 1] for s in self.shape], indexing="ij")
        return self.world(np.stack([g.ravel() for g in grids], axis=-1))

    def mismatch(self, other: "Geometry", tolerance_mm: float | None = None) -> str | None:
        """Why ``other`` is not the same grid as this one, or None when it is.

        Grids match when shapes are equal and every corner voxel lands within
        ``tolerance_mm`` (default: 1/1000 of the smallest voxel size) of its twin.
        """
        if self.shape != other.shape:
            return f"shape {other.shape} differs from {self.shape}"
        if not (self.spacing_known and other.spacing_known):
            return None
        tol = tolerance_mm if tolerance_mm is not None else 1e-3 * min(self.spacing)
        offset = float(np.max(np.linalg.norm(self.corners() - other.corners(), axis=-1)))
        if offset > tol:
            return (
                f"grid differs by up to {offset:.4g} mm (tolerance {tol:.2g} mm): "
                f"spacing {_fmt(other.spacing)} vs {_fmt(self.spacing)}, "
                f"origin {_fmt(other.origin)} vs {_fmt(self.origin)}, "
                f"orientation {other.orientation} vs {self.orientation}"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the keys `medseg info --json` documents)."""
        return {
            "shape": list(self.shape),
            "spacing": [_sig(s) for s in self.spacing],
            "spacing_known": self.spacing_known,
            "origin": [_sig(v) for v in self.origin],
            "orientation": self.orientation,
            "affine": [[_sig(v) for v in row] for row in self.affine],
        }


def _sig(value: float) -> float:
    """Nine significant digits: exact enough for 4 nm pixels and 500 mm origins alike."""
    return float(f"{float(value):.9g}") + 0.0


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
