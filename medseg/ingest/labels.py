"""Reference masks: loaded like any scan, then held to their image's grid and classes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.errors import LabelError, ScanError
from medseg.geometry import Geometry
from medseg.ingest.scan import Scan, ScanRef

__all__ = ["load_label", "validate_label"]


def load_label(
    source: ScanRef | Path | str,
    image: Scan,
    classes: Sequence[int] | None = None,
    tolerance_mm: float | None = None,
) -> Scan:
    """Load a label map for ``image`` and validate it (see ``validate_label``)."""
    from medseg.ingest import LoadOptions, load, ref_for_path

    ref = source if isinstance(source, ScanRef) else ref_for_path(Path(source))
    try:
        label = load(ref, LoadOptions(color="channels", palette="indices"))
    except LabelError:
        raise
    except ScanError as exc:
        raise LabelError(exc.paths, f"reference mask unreadable: {exc.problem}", exc.fix) from exc
    return validate_label(label, image, classes, tolerance_mm)


def validate_label(
    label: Scan,
    image: Scan,
    classes: Sequence[int] | None = None,
    tolerance_mm: float | None = None,
) -> Scan:
    """Return the label as one integer channel on the image's grid, or raise LabelError.

    Checks: one channel; same grid (shape, and affine within tolerance when both files
    carry physical geometry); integer values (a float file holding integers is cast);
    every value among ``classes`` when they are given.
    """
    path = label.ref.path
    if label.channels != 1:
        raise LabelError(
            path,
            f"label has {label.channels} channels (e.g. RGB) where one channel of class values is expected",
            "save the mask as a single-channel integer image (one class value per pixel)",
        )
    problem = image.geometry.mismatch(label.geometry, tolerance_mm)
    if problem:
        raise LabelError(
            [path, image.ref.path],
            f"label grid does not match its image: {problem}",
            "resample the mask onto the image grid (nearest neighbour) or pair it with the right image",
        )
    values = label.array
    notes = list(label.notes)
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        fractional = ~finite | (values != np.round(values))
        count = int(np.count_nonzero(fractional))
        if count:
            example = values[fractional][:3]
            raise LabelError(
                path,
                f"label holds {count} non-integer values (e.g. {', '.join(f'{v:g}' for v in example)})",
                "a mask must hold integer class values; "
                "check that this is a mask and not an image or a probability map",
            )
        values = values.astype(np.int32)
        notes.append("float label holding integers cast to int")
    elif values.dtype == np.bool_:
        values = values.astype(np.uint8)
    if classes is not None:
        present = np.unique(values)
        extra = sorted(set(present.tolist()) - {int(c) for c in classes})
        if extra:
            counts = {v: int(np.count_nonzero(values == v)) for v in extra[:5]}
            raise LabelError(
                path,
                f"label values {extra[:10]} are not among the configured classes {sorted(int(c) for c in classes)} "
                f"(voxel counts: {counts})",
                "add them to data.classes in the config, or fix the mask",
            )
    values = _smallest_int(values)
    geometry = (
        image.geometry
        if not label.geometry.spacing_known
        else Geometry(label.geometry.affine, label.geometry.shape, label.geometry.spacing_known, label.geometry.notes)
    )
    return Scan(ref=label.ref, array=values, geometry=geometry, modality="SEG", metadata=label.metadata, notes=notes)


def _smallest_int(values: np.ndarray) -> np.ndarray:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return values.astype(dtype, copy=False)
    return values.astype(np.int64, copy=False)
