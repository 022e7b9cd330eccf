"""Put a predicted mask on its reference's grid before scoring: as is, reoriented, or resampled.

Two files can describe the very same voxels while storing the axes in another order: a
reference written in LAS and a prediction in LPS have the same voxel centres, only one
array is flipped along x. Scoring such a pair must not fail, and must not interpolate
either, so a grid that coincides with the reference up to a permutation and flips of its
axes is transposed/flipped exactly (nibabel's ``apply_orientation``). Which array axis
matches which is read from the affines (the direction cosines), not from the orientation
codes, so oblique grids match too; the match is then confirmed by the corner voxel centres
landing on the reference's within ``Geometry.mismatch``'s tolerance.

Grids that differ in anything else (spacing, shape, origin, rotation) are refused with the
real world offset between them, unless the caller asks for ``resample="nearest"``: then
the prediction is resampled onto the reference grid by nearest neighbour (a label map must
keep its class values), and the case says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff

from medseg.constants import RESAMPLE_MODES
from medseg.errors import LabelError
from medseg.geometry import Geometry
from medseg.ingest import Scan

__all__ = ["RESAMPLE_MODES", "Alignment", "align_to_reference", "match_axes", "reoriented", "world_offset"]


@dataclass(frozen=True)
class Alignment:
    """The prediction's values on the reference grid and how they got there.

    ``method`` is "same" (already on the grid), "reoriented" (exact transpose/flip) or
    "resampled" (nearest neighbour); ``note`` says what was done, for the report.
    """

    array: np.ndarray
    method: str
    note: str | None = None


def match_axes(moving: Geometry, fixed: Geometry) -> np.ndarray | None:
    """The nibabel orientation transform that puts ``moving``'s array axes in ``fixed``'s order.

    Row i is (the fixed axis that moving axis i runs along, +1 same direction / -1 opposite),
    chosen as the permutation whose axes are most nearly parallel. This says nothing about
    whether the grids then coincide (see ``reoriented`` and ``world_offset``). None when the
    grids differ in dimension; the identity when either has no physical geometry, since
    such a grid has no direction to match.
    """
    ndim = fixed.ndim
    if moving.ndim != ndim:
        return None
    identity = np.column_stack([np.arange(ndim), np.ones(ndim)])
    if not (moving.spacing_known and fixed.spacing_known):
        return identity
    cosines = fixed.direction[:, :ndim].T @ moving.direction[:, :ndim]  # [fixed axis, moving axis]
    best = max(
        itertools.permutations(range(ndim)),
        key=lambda perm: sum(abs(cosines[j, perm[j]]) for j in range(ndim)),
    )
    ornt = identity.copy()
    for fixed_axis, moving_axis in enumerate(best):
        ornt[moving_axis] = (fixed_axis, 1.0 if cosines[fixed_axis, moving_axis] >= 0 else -1.0)
    return ornt


def reoriented(geometry: Geometry, ornt: np.ndarray) -> Geometry:
    """The grid of ``apply_orientation(array, ornt)``: same voxel centres, axes permuted/flipped."""
    ndim = geometry.ndim
    shape = [0] * ndim
    for axis, (new_axis, _) in enumerate(ornt):
        shape[int(new_axis)] = geometry.shape[axis]
    small = inv_ornt_aff(ornt, geometry.shape)  # (ndim+1)^2: new voxel index -> old voxel index
    index_map = np.eye(4)
    index_map[:ndim, :ndim] = small[:ndim, :ndim]
    index_map[:ndim, 3] = small[:ndim, ndim]
    return Geometry(geometry.affine @ index_map, tuple(shape), geometry.spacing_known, geometry.notes)


def world_offset(moving: Geometry, fixed: Geometry) -> float | None:
    """Largest distance in mm between matching corner voxel centres once axes are matched.

    None where it means nothing: different dimensions, or a grid without physical size.
    """
    ornt = match_axes(moving, fixed)
    if ornt is None or not (moving.spacing_known and fixed.spacing_known):
        return None
    return float(np.max(np.linalg.norm(reoriented(moving, ornt).corners() - fixed.corners(), axis=-1)))


def align_to_reference(pred: Scan, ref: Scan, resample: str | None = None) -> Alignment:
    """The prediction's single-channel values on ``ref``'s grid, or LabelError naming both files.

    Same grid: as is. Same voxel centres in another axis order: transposed/flipped exactly.
    Otherwise, with ``resample="nearest"``: nearest-neighbour resampling onto the reference
    grid (reference voxels outside the prediction count as 0); without: LabelError giving
    the world offset, both grids and the ``--resample nearest`` fix.
    """
    if resample is not None and resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES} or None, not {resample!r}")
    values, have, want = pred.array[0], pred.geometry, ref.geometry
    if want.mismatch(have) is None:
        return Alignment(values, "same")
    ornt = match_axes(have, want)
    if ornt is not None and not _is_identity(ornt):
        candidate = reoriented(have, ornt)
        if want.mismatch(candidate) is None:
            note = (
                f"prediction reoriented {have.orientation} -> {want.orientation} onto the reference grid "
                "(exact: axes permuted/flipped, no interpolation)"
            )
            return Alignment(apply_orientation(values, ornt), "reoriented", note)
    paths = [pred.ref.path, ref.ref.path]
    offset = world_offset(have, want)
    if not (have.spacing_known and want.spacing_known):
        which = "reference" if have.spacing_known else "prediction"
        raise LabelError(
            paths,
            f"prediction and reference are on different grids: shape {have.shape} vs {want.shape} (prediction vs "
            f"reference); the {which} has no physical "
            "pixel size, so it cannot be reoriented or resampled onto the other",
            f"write the prediction at the reference's shape {want.shape}, or pair it with the right reference",
        )
    described = _describe(have, want, offset)
    if resample is None:
        raise LabelError(
            paths,
            f"prediction and reference are on different grids: {described}",
            "pass --resample nearest to resample the prediction onto the reference grid "
            "by nearest neighbour, or write the prediction on the reference scan's grid (as `medseg predict` "
            "does), or pair it with the right reference",
        )
    array, outside = _resample_nearest(values, have, want)
    total = int(np.prod(want.shape))
    if outside == total:
        raise LabelError(
            paths,
            f"the prediction does not overlap the reference grid at all, so resampling leaves nothing: {described}",
            "pair the prediction with the reference of the same case, or check both files' affines",
        )
    note = (
        f"prediction resampled onto the reference grid by nearest neighbour (an approximation, not exact): "
        f"shape {have.shape} spacing {_fmt(have.spacing)} mm {have.orientation} -> shape {want.shape} "
        f"spacing {_fmt(want.spacing)} mm {want.orientation}"
        + (f", corner voxel centres up to {offset:.4g} mm apart" if offset is not None else "")
        + (f"; {outside} of {total} reference voxels lie outside the prediction and count as 0" if outside else "")
    )
    return Alignment(array, "resampled", note)


def _resample_nearest(values: np.ndarray, have: Geometry, want: Geometry) -> tuple[np.ndarray, int]:
    """Nearest-neighbour values of ``values`` (on ``have``) at ``want``'s voxel centres.

    Both grids are treated as 3D (a 2D grid is one slice thick), so a 2D mask on a 3D
    reference works too. Returns the array and how many reference voxels fall outside
    the prediction (each voxel covering half a step either side of its centre).
    """
    from scipy import ndimage  # only here: every `medseg` command imports this module at start-up

    source = values.reshape(values.shape + (1,) * (3 - values.ndim))
    shape = tuple(want.shape) + (1,) * (3 - want.ndim)
    index_map = np.linalg.inv(have.affine) @ want.affine  # reference voxel index -> prediction voxel index
    kwargs = {
        "matrix": index_map[:3, :3],
        "offset": index_map[:3, 3],
        "output_shape": shape,
        "order": 0,
        "mode": "grid-constant",
        "cval": 0,
    }
    resampled = ndimage.affine_transform(source, **kwargs)
    inside = ndimage.affine_transform(np.ones(source.shape, np.uint8), **kwargs)
    return resampled.reshape(want.shape), int(inside.size - np.count_nonzero(inside))


def _describe(have: Geometry, want: Geometry, offset: float | None) -> str:
    """Both grids side by side (prediction vs reference), led by how far apart they are."""
    ornt = match_axes(have, want)
    same_shape = ornt is not None and reoriented(have, ornt).shape == want.shape
    if offset is not None and same_shape:
        tol = 1e-3 * min(want.spacing)
        lead = f"grid differs by up to {offset:.4g} mm after matching axes (tolerance {tol:.2g} mm); shape {have.shape}"
        lead += f" vs {want.shape}" if have.shape != want.shape else ""
    elif offset is not None:
        lead = (
            f"shape {have.shape} vs {want.shape}, corner voxel centres up to {offset:.4g} mm apart after matching axes"
        )
    else:
        lead = f"shape {have.shape} vs {want.shape}"
    return (
        f"{lead}, spacing {_fmt(have.spacing)} vs {_fmt(want.spacing)} mm, origin {_fmt(have.origin)} vs "
        f"{_fmt(want.origin)}, orientation {have.orientation} vs {want.orientation} (prediction vs reference)"
    )


def _is_identity(ornt: np.ndarray) -> bool:
    return bool(np.array_equal(ornt[:, 0], np.arange(len(ornt))) and np.all(ornt[:, 1] == 1))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
