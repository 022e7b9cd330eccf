"""Mask writers: each mask lands in its scan's own geometry, atomically, and proves it.

Every writer writes to a temporary file in the destination folder and renames it into
place, so a crash leaves no half-written mask; then it reads the file back and checks
shape, geometry and values against the scan, so a mask that would not overlay its scan
in a viewer is an error here rather than a surprise in 3D Slicer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

from medseg import __version__
from medseg.export.dicom_seg import write_dicom_seg
from medseg.errors import ExportError
from medseg.files import atomic_path, contained_path, journal_root, unique_names
from medseg.geometry import Geometry
from medseg.ingest.scan import Scan, ScanRef
from medseg.export.rtstruct import write_rtstruct

__all__ = [
    "ExportError",
    "atomic_path",
    "check_output_outside_inputs",
    "default_formats",
    "write_nifti_mask",
    "spatial_mask",
    "write_dicom_seg",
    "write_rtstruct",
    "write_tiff_mask",
    "write_png_masks",
    "export_mask",
    "mask_paths",
    "CLASS_COLOURS",
]

# Per-class display colours (RGB), class index 1, 2, ... (index 0 is usually background).
CLASS_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
]


def check_output_outside_inputs(output: Path, scan: Scan) -> None:
    """Refuse to write into the folder a scan was read from: inputs are never touched."""
    out = output.resolve()
    for source in {p.resolve().parent for p in scan.ref.paths}:
        if out == source or source in out.parents:
            raise ExportError(
                f"{output}: output folder is inside the input folder {source}; "
                "choose an output folder outside the input tree (medseg never writes beside input files)"
            )


def default_formats(kind: str) -> tuple[str, ...]:
    """What a person expects for each input kind."""
    return {
        "dicom": ("nifti", "dicom-seg"),
        "nifti": ("nifti",),
        "tiff": ("tiff",),
        "image-sequence": ("tiff", "png"),
    }.get(kind, ("png",))


_SUFFIX = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm", "tiff": ".tif"}


def mask_paths(
    output_dir: Path, ref: ScanRef, shape: Sequence[int], formats: Sequence[str] | None = None
) -> dict[str, list[Path]]:
    """Every file `export_mask` writes for the scan ``ref`` on a grid of ``shape``, per format.

    Why one function: the pipeline checks these names before the model runs (a user's file
    there is never replaced unless asked) and records them before the write (a killed run
    leaves masks the ledger still knows); `export_mask` writes exactly these, so the list
    checked and the files written cannot differ. ``<id>.nii.gz``, ``<id>.seg.dcm``,
    ``<id>.rtstruct.dcm``, ``<id>.tif``; PNG: ``<id>.png`` for a 2D grid, else one file
    per slice in ``<id>/``, named like the input images where there is one per slice.
    """
    case = ref.id
    paths: dict[str, list[Path]] = {}
    for fmt in tuple(formats or default_formats(ref.kind)):
        if fmt in _SUFFIX:
            paths[fmt] = [contained_path(output_dir, case, _SUFFIX[fmt])]
        elif fmt == "png" and len(shape) == 2:
            paths[fmt] = [contained_path(output_dir, case, ".png")]
        elif fmt == "png":
            planes = shape[2]
            stems = [Path(p).stem for p in ref.paths] if len(ref.paths) == planes else None
            names = unique_names(stems) if stems else [str(k) for k in range(planes)]  # 1.png, 1.PNG: two masks
            paths[fmt] = [contained_path(output_dir, f"{case}/{name}", ".png") for name in names]
        else:
            raise ExportError(f"unknown mask format {fmt!r}; use nifti, dicom-seg, rtstruct, tiff or png")
    return paths


def spatial_mask(mask: np.ndarray, scan: Scan, target: Path | None = None) -> np.ndarray:
    """``mask`` on the scan's spatial grid (a leading channel of 1 dropped); ExportError if it is not."""
    mask = np.asarray(mask)
    if mask.shape == (1,) + scan.geometry.shape:
        mask = mask[0]
    if mask.shape != scan.geometry.shape:
        where = f"{target}: " if target is not None else ""
        raise ExportError(
            f"{where}mask shape {mask.shape} does not match the grid {scan.geometry.shape} of {scan.ref.path}"
        )
    return mask


def write_nifti_mask(mask: np.ndarray, scan: Scan, path: Path) -> Path:
    """NIfTI with the scan's affine exactly (sform and qform), for NIfTI and DICOM inputs alike."""
    mask = spatial_mask(mask, scan)
    data = mask if mask.ndim == 3 else mask[..., None]
    img = nib.Nifti1Image(data, scan.geometry.affine)
    img.set_sform(scan.geometry.affine, code=2)  # aligned to the scan
    img.set_qform(scan.geometry.affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = f"medseg {__version__} mask"[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
        _check_nifti(tmp, mask, scan.geometry, path)
    return path


def _check_nifti(path: Path, mask: np.ndarray, geometry: Geometry, shown: Path) -> None:
    back = nib.load(str(path))
    data = np.asanyarray(back.dataobj)
    if data.ndim == 3 and mask.ndim == 2:
        data = data[..., 0]
    if data.shape != mask.shape or not np.array_equal(data, mask):
        raise ExportError(f"{shown}: mask read back with shape {data.shape} or values differing from what was written")
    written = Geometry(back.affine, geometry.shape, geometry.spacing_known)
    problem = geometry.mismatch(written, tolerance_mm=1e-4 + 1e-5 * max(geometry.spacing))
    if problem:
        raise ExportError(f"{shown}: written mask does not overlay its scan: {problem}")


def write_tiff_mask(mask: np.ndarray, scan: Scan, path: Path) -> Path:
    """TIFF with the scan's shape (pages = z) and pixel size tags (ImageJ, µm)."""
    mask = spatial_mask(mask, scan)
    pages = np.ascontiguousarray(mask.T if mask.ndim == 2 else np.transpose(mask, (2, 1, 0)))
    options: dict = {"imagej": True, "metadata": {"axes": "YX" if mask.ndim == 2 else "ZYX"}}
    if scan.geometry.spacing_known:
        um = [s * 1000.0 for s in scan.geometry.spacing]
        options["resolution"] = (1.0 / um[0], 1.0 / um[1])
        options["metadata"].update({"unit": "um"})
        if mask.ndim == 3:
            options["metadata"]["spacing"] = um[2]
    if pages.dtype not in (np.uint8, np.uint16):
        pages = pages.astype(np.uint16 if pages.max() > 255 else np.uint8)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, pages, **options)
        back = tifffile.imread(tmp)
        if back.shape != pages.shape or not np.array_equal(back, pages):
            raise ExportError(f"{path}: TIFF mask read back with shape {back.shape}, expected {pages.shape}")
        _check_tiff_spacing(tmp, scan, path)
    return path


def _check_tiff_spacing(tmp: Path, scan: Scan, shown: Path) -> None:
    from medseg.ingest import ScanRef, load

    back = load(ScanRef("check", "tiff", (tmp,)))
    problem = (
        scan.geometry.mismatch(back.geometry, tolerance_mm=1e-6 * max(scan.geometry.spacing) + 1e-12)
        if scan.geometry.spacing_known
        else (None if back.geometry.shape == scan.geometry.shape else "shape differs")
    )
    if problem:
        raise ExportError(f"{shown}: TIFF mask does not match its scan's grid: {problem}")


def write_png_masks(mask: np.ndarray, scan: Scan, paths: Sequence[Path]) -> list[Path]:
    """PNG per 2D slice (one PNG for a 2D image) at ``paths``, as `mask_paths` names them."""
    mask = spatial_mask(mask, scan)
    dtype = np.uint8 if mask.max() <= 255 and mask.min() >= 0 else np.uint16
    planes = [mask] if mask.ndim == 2 else [mask[:, :, k] for k in range(mask.shape[2])]
    if len(planes) != len(paths):
        raise ExportError(f"{scan.ref.path}: {len(planes)} mask slices for {len(paths)} PNG names")
    written = []
    for path, plane in zip(paths, planes):
        with atomic_path(path) as tmp:
            Image.fromarray(np.ascontiguousarray(plane.T.astype(dtype))).save(tmp, format="PNG")
            back = np.asarray(Image.open(tmp))
            if not np.array_equal(back, plane.T.astype(dtype)):
                raise ExportError(f"{path}: PNG mask read back differently")
        written.append(path)
    return written


def export_mask(
    mask: np.ndarray,
    scan: Scan,
    output_dir: Path,
    classes: Mapping[str, int],
    formats: Sequence[str] | None = None,
    coding: Mapping[str, Any] | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Write ``mask`` (label values, scan grid) for ``scan`` under ``output_dir`` in each format.

    ``coding`` is the config's ``data.classes_coding`` (plain data), for DICOM SEG segments and RTSTRUCT ROIs.
    ``notes``: where a DICOM object (SEG, RTSTRUCT) is truly impossible for this series (no patient
    geometry, say), its sentence goes here and the other formats are still written; without a
    list, or when nothing else could be written, that ExportError is raised.

    File names follow the scan id, as `mask_paths` gives them: ``<id>.nii.gz``, ``<id>.seg.dcm``,
    ``<id>.rtstruct.dcm``, ``<id>.tif``, ``<id>/`` (PNGs).
    """
    check_output_outside_inputs(output_dir, scan)
    targets = mask_paths(output_dir, scan.ref, spatial_mask(mask, scan).shape, formats)
    written: list[Path] = []
    refused: list[ExportError] = []
    with journal_root(output_dir):  # temporary files journalled where a later run's cleanup looks
        for fmt, paths in targets.items():
            if fmt == "nifti":
                written.append(write_nifti_mask(mask, scan, paths[0]))
            elif fmt in ("dicom-seg", "rtstruct"):
                writer = write_dicom_seg if fmt == "dicom-seg" else write_rtstruct
                try:
                    written.append(writer(mask, scan, paths[0], classes, coding=coding))
                except ExportError as exc:
                    if notes is None:
                        raise
                    refused.append(exc)
                    notes.append(f"{fmt} not written: {exc}")
            elif fmt == "tiff":
                written.append(write_tiff_mask(mask, scan, paths[0]))
            else:
                written.extend(write_png_masks(mask, scan, paths))
    if refused and not written:
        raise refused[0]
    return written
