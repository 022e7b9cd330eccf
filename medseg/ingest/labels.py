"""Reference masks: loaded like any scan, then held to their image's grid and classes.

Two kinds of reference: a label map (one file whose values are class values, or instance
ids when the config says ``data.labels_are: instances``), and the per-image instance layout
of the Kaggle Data Science Bowl 2018 (``CASE/images/CASE.png`` + ``CASE/masks/*.png``, one
binary mask per object), which ``load_instance_masks`` composes into one instance label map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.errors import LabelError, ScanError
from medseg.files import natural_key
from medseg.geometry import Geometry
from medseg.ingest.budget import BudgetError, check_budget
from medseg.ingest.microscopy import load_image
from medseg.ingest.scan import LoadOptions, Scan, ScanRef

__all__ = ["load_instance_masks", "load_label", "validate_label"]


def load_label(
    source: ScanRef | Path | str,
    image: Scan,
    classes: Sequence[int] | None = None,
    tolerance_mm: float | None = None,
) -> Scan:
    """Load a label map for ``image`` and validate it (see ``validate_label``)."""
    from medseg.ingest import load, ref_for_path

    ref = source if isinstance(source, ScanRef) else ref_for_path(Path(source))
    try:
        if ref.kind == "instance-masks":  # sizes checked against the image, so the odd mask is named
            label = load_instance_masks(ref, shape=image.geometry.shape)
        else:
            label = load(ref, LoadOptions(color="channels", palette="indices"))
    except LabelError:
        raise
    except ScanError as exc:
        raise LabelError(exc.paths, f"reference mask unreadable: {exc.problem}", exc.fix) from exc
    return validate_label(label, image, classes, tolerance_mm)


def load_instance_masks(ref: ScanRef, options: LoadOptions = LoadOptions(), shape: Sequence[int] | None = None) -> Scan:
    """One instance label map (int32, ids 1..N, 0 where no mask is set) from one mask file per instance.

    Instance k is the k-th file in natural name order, so ids are stable across runs; a
    pixel is in a mask where any of its channels is non-zero. An empty (all-zero) mask keeps
    its id and simply has no pixels, with a note. Overlapping masks: the later file (in
    that order) wins the shared pixels, with a note saying how many; the pixels stay
    adjacent to the earlier instance, so they lie on its touching border and become
    background in a training target (``medseg.data.weights.separate_touching``).
    shape: the image's (x, y) size; a mask of another size is refused, naming that mask
    (without it, the first mask's size is the reference).
    """
    paths = sorted(ref.paths, key=natural_key)
    mask_options = LoadOptions(color="grey", palette="indices", memory_budget_mb=options.memory_budget_mb)
    out: np.ndarray | None = None
    geometry: Geometry | None = None
    reference = None if shape is None else tuple(int(n) for n in shape)
    empty: list[str] = []
    overlapping = 0
    for k, path in enumerate(paths, start=1):
        try:
            mask = load_image(ScanRef(ref.id, "image", (path,)), mask_options)
        except BudgetError:
            raise
        except ScanError as exc:
            raise LabelError(path, f"instance mask unreadable: {exc.problem}", exc.fix) from exc
        size = mask.geometry.shape
        if reference is None:
            reference = size
        if size != reference:
            against = "its image" if shape is not None else paths[0].name
            raise LabelError(
                path,
                f"instance mask is {' x '.join(map(str, size))} pixels but {against} is "
                f"{' x '.join(map(str, reference))}",
                "every mask of a case must have its image's size; re-export or remove this mask",
            )
        if out is None:
            what = f"the instance map of {len(paths)} masks"
            check_budget(path, int(np.prod(size)) * 4, what, options.memory_budget_mb)
            out = np.zeros(size, dtype=np.int32)
            geometry = mask.geometry
        pixels = np.any(mask.array != 0, axis=0)
        if not pixels.any():
            empty.append(path.name)
            continue
        overlapping += int(np.count_nonzero(out[pixels]))
        out[pixels] = k
    if out is None or geometry is None:
        raise LabelError(ref.paths or [ref.id], "no instance mask files", "put one mask image per object in masks/")
    notes = [f"{len(paths)} instance mask file(s) composed into one instance map (ids in file name order)"]
    if empty:
        notes.append(f"{len(empty)} empty instance mask(s) (no pixel set): {', '.join(empty[:5])}")
    if overlapping:
        notes.append(f"{overlapping} pixel(s) set in more than one instance mask: the later file (name order) has them")
    return Scan(ref=ref, array=out[None], geometry=geometry, modality="SEG", metadata={}, notes=notes)


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
