"""The one geometry object that travels with every scan and every mask.

World convention: nibabel's RAS+ in millimetres. ``affine @ (i, j, k, 1)`` gives the
world position of the centre of voxel ``array[..., i, j, k]``, where the array is channel
first and its spatial axes are in affine order (for DICOM: column, row, slice; for
microscopy: x, y, z). DICOM's LPS is converted once, at reading, by ``lps_to_ras``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import ScanError

__all__ = [
    "LPS_TO_RAS",
    "OBLIQUE_TOLERANCE_DEG",
    "Geometry",
    "check_geometry",
    "check_values",
    "grid_notes",
    "lps_to_ras",
    "obliquity_degrees",
]

# Flipping the first two world axes turns DICOM's LPS into RAS (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel→LPS affine into a voxel→RAS affine."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


# Axes closer than this to a patient axis count as aligned: direction cosines stored with six
# decimals (DICOM) or in float32 (NIfTI) sit a few thousandths of a degree off the axes.
OBLIQUE_TOLERANCE_DEG = 0.05
# Every note the grid derives from its own affine starts with one of these (so it is recomputed,
# never carried over stale, when a Geometry is rebuilt with another affine).
_DERIVED_PREFIXES = ("oblique: ",)


def obliquity_degrees(affine: np.ndarray) -> float:
    """The largest angle, in degrees, between an axis of the grid and the patient axis nearest to it.

    Why: an oblique scan (a tilted MR plane, a reformatted CT) is shown resampled by viewers
    that display patient axes, and a mask on its grid is oblique too; a person comparing them
    slice by slice should know. 0 for a grid along the patient axes (in any order or
    direction). Same measure as ``nibabel.affines.obliquity`` (per axis: the arccos of its
    largest direction cosine), with the cosines clipped to 1 so rounding never gives NaN.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    cosines = np.abs(matrix / np.where(norms == 0, 1.0, norms)).max(axis=0)
    cosines = np.where(norms == 0, 1.0, cosines)  # a zero-length axis has no direction (check_geometry refuses it)
    return float(np.degrees(np.arccos(np.clip(cosines, 0.0, 1.0))).max())


def grid_notes(affine: np.ndarray) -> tuple[str, ...]:
    """What a person should know about a grid from its affine alone (today: that it is oblique).

    Every Geometry carries these in ``notes``, so `medseg info`, predictions.json and the
    review page show them for every reader (DICOM, NIfTI, ...) without each reader repeating them.
    """
    angle = obliquity_degrees(affine)
    if not np.isfinite(angle) or angle < OBLIQUE_TOLERANCE_DEG:
        return ()
    return (f"oblique: axes {angle:.1f} degrees from the patient axes",)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a scan: spatial shape plus the 4x4 voxel→RAS affine.

    ``spacing_known`` is False where the file carried no physical pixel size (a plain PNG):
    such a grid matches any other grid of the same shape. ``notes`` are the reader's notes
    about the grid followed by those derived from the affine (``grid_notes``), which are
    recomputed on construction so that a rebuilt grid never carries a stale one.
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
        given = tuple(n for n in self.notes if not n.startswith(_DERIVED_PREFIXES))
        object.__setattr__(self, "notes", given + grid_notes(affine))

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


# A voxel edge shorter than this (1 femtometre in mm) is a zero, not a pixel size.
MIN_VOXEL_MM = 1e-12
# |det| / product of the axis lengths (the volume of a unit voxel's parallelepiped) below this
# means two axes are (nearly) parallel: the grid is flat and cannot be inverted.
MIN_AXIS_SINE = 1e-6

_FIX = "the header is corrupt; fix {what} or re-export the scan"
_GRID_FIX = "the header is corrupt; correct the fields named here or re-export the scan"


def check_values(
    paths: Path | str | Iterable[Path | str],
    name: str,
    values: Sequence[float] | np.ndarray,
    *,
    positive: bool = False,
) -> np.ndarray:
    """A geometry attribute read from a file (a DICOM tag, NIfTI field, pixel size), refused unless sane.

    Every reader passes each value that places voxels in space through here, so NaN, Inf
    or a zero/negative voxel size is refused with the attribute's name and value instead
    of reaching a LinAlgError, a MONAI message or a silent mask.

    Args:
        paths: the file(s) the values came from.
        name: the attribute as the file names it, e.g. "PixelSpacing" or "pixdim[1:4]".
        values: the values as read.
        positive: also refuse values of zero or below (voxel sizes).
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    shown = _fmt(arr) if arr.size > 1 else f"{arr[0]:.6g}" if arr.size else "()"
    if not np.all(np.isfinite(arr)):
        problem = f"{name} {shown} is not finite (NaN or Inf), so voxels cannot be placed in space"
        raise ScanError(paths, problem, _FIX.format(what=name))
    if positive and np.any(arr <= 0):
        problem = f"{name} {shown} must be positive: a voxel size of zero or below places no voxel in space"
        raise ScanError(paths, problem, _FIX.format(what=name))
    return arr


def check_geometry(
    paths: Path | str | Iterable[Path | str],
    affine: np.ndarray,
    shape: Sequence[int],
    source: str,
) -> None:
    """Refuse a voxel grid that cannot be placed in space: every reader calls this before building a Geometry.

    Checks that every axis holds at least one voxel, that the 4x4 voxel-to-world affine is
    finite, that no axis has zero length, and that no two axes are (nearly) parallel: each
    of those makes the grid singular, which would fail later as a LinAlgError, inside
    MONAI, or as a mask that overlays nothing.

    Args:
        paths: the file(s) the grid was read from.
        affine: the voxel-to-world affine as built from the file.
        shape: the spatial shape of the array.
        source: the attributes the affine came from, with their values where short
            (e.g. "the sform (srow_x ..., srow_y ..., srow_z ...)").
    """
    dims = [int(s) for s in shape]
    if any(d < 1 for d in dims):
        problem = f"the image size {tuple(dims)} has an empty axis ({source})"
        raise ScanError(paths, problem, _FIX.format(what="the image size"))
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ScanError(paths, f"{source} gives a {matrix.shape} affine, not 4x4", _FIX.format(what="the geometry"))
    text = np.array2string(matrix, precision=4, separator=", ").replace("\n", "")
    if not np.all(np.isfinite(matrix)):
        raise ScanError(
            paths, f"{source} gives an affine with NaN or Inf values (not finite, so singular): {text}", _GRID_FIX
        )
    norms = np.linalg.norm(matrix[:3, :3], axis=0)
    flat = [axis for axis in range(3) if norms[axis] < MIN_VOXEL_MM]
    if flat:
        raise ScanError(
            paths,
            f"{source} gives a singular affine: array axis {', '.join(map(str, flat))} has zero length "
            f"(voxel size 0): {text}",
            _GRID_FIX,
        )
    sine = abs(float(np.linalg.det(matrix[:3, :3]))) / float(np.prod(norms))
    if sine < MIN_AXIS_SINE:
        raise ScanError(
            paths,
            f"{source} gives a singular affine: its axes are (nearly) parallel "
            f"(|det| / axis lengths = {sine:.2g}): {text}",
            _GRID_FIX,
        )


def _sig(value: float) -> float:
    """Nine significant digits: exact enough for 4 nm pixels and 500 mm origins alike."""
    return float(f"{float(value):.9g}") + 0.0


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
