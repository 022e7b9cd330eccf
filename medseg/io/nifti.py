"""NIfTI volumes (.nii, .nii.gz) through nibabel.

nibabel already picks the sform when its code is set and the qform otherwise, and applies
scl_slope/scl_inter when reading the data; this module adds the checks a segmentation
pipeline needs (finite values, an invertible affine, a declared size the file can hold)
and the channel-first layout.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import ScanError
from medseg.geometry import Geometry
from medseg.io.scan import LoadOptions, Scan, ScanRef

__all__ = ["load_nifti", "read_nifti_header"]


def read_nifti_header(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI file lazily (header only); ScanError if it is not one."""
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise ScanError(path, f"not a readable NIfTI file ({exc})", "check that the file is complete and really NIfTI") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(path, f"{type(img).__name__} is not a NIfTI image", "convert it to NIfTI (.nii.gz)")
    return img


def _check_declared_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that declares more data than the file holds, before allocating it."""
    shape = img.header.get_data_shape()
    itemsize = img.header.get_data_dtype().itemsize
    needed = int(np.prod(shape, dtype=np.float64)) * itemsize
    if str(path).lower().endswith(".gz"):
        # A gzip stream cannot expand beyond ~1032:1; anything more is a lie in the header.
        available = path.stat().st_size * 1032
    else:
        available = path.stat().st_size - int(img.header.get("vox_offset", 0))
    if needed > available:
        raise ScanError(
            path,
            f"header declares shape {tuple(int(s) for s in shape)} ({needed / 1e6:.1f} MB) "
            f"but the file holds at most {max(available, 0) / 1e6:.1f} MB",
            "the file is truncated or its header is corrupt; re-export it",
        )


def load_nifti(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """Load a 2D/3D/4D NIfTI; a 4th (or 5th) axis becomes the channel axis."""
    path = ref.paths[0]
    img = read_nifti_header(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(
            path,
            f"the affine (sform/qform) is singular or not finite:\n{np.array2string(affine, precision=4)}",
            "fix the header (e.g. set a valid qform with nibabel) so voxels can be placed in space",
        )
    try:
        _check_declared_size(path, img)
        data = np.asanyarray(img.dataobj)
    except (nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, gzip.BadGzipFile, MemoryError) as exc:
        raise ScanError(path, f"cannot read the voxel data ({exc})", "the file is truncated or corrupt; re-export it") from exc
    notes: list[str] = []
    if data.dtype.names:  # RGB24 / RGBA32: one structured value per voxel → colour channels
        names = data.dtype.names
        data = np.stack([data[name] for name in names], axis=-1)
        notes.append(f"{'/'.join(names)} colour voxels read as {len(names)} channels")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype == np.float64:
        data = data.astype(np.float32)
        notes.append("float64 data stored as float32")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ScanError(
                path,
                f"{bad} voxels are NaN or Inf",
                "replace them before segmenting (e.g. numpy.nan_to_num) and save a new file",
            )
    array = _channels_first(path, data)
    if array.shape[0] > 1:
        notes.append(f"axes beyond the third read as {array.shape[0]} channels")
    hdr = img.header
    code_s, code_q = int(hdr.get("sform_code", 0)), int(hdr.get("qform_code", 0))
    if code_s == 0 and code_q == 0:
        notes.append("neither sform nor qform is set: nibabel's default (scaled, unrotated) affine used")
    intent = ""
    try:
        intent = str(hdr.get_intent()[0])
    except Exception:  # pragma: no cover - unusual intent codes
        pass
    return Scan(
        ref=ref,
        array=array,
        geometry=Geometry(affine, array.shape[1:]),
        modality="",
        metadata={
            "series_description": str(hdr.get("descrip", b"").tobytes().rstrip(b"\0").decode("latin-1", "replace")).strip()
            if hasattr(hdr.get("descrip", b""), "tobytes")
            else "",
            "sform_code": code_s,
            "qform_code": code_q,
            "intent": intent,
            "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        },
        notes=notes,
    )


def _channels_first(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        return data[None, :, :, None]
    if data.ndim == 3:
        return data[None]
    if data.ndim in (4, 5):
        # 4D: x, y, z, t/c. 5D (x, y, z, 1, c) is the NIfTI way to store vectors per voxel.
        channels = data.reshape(data.shape[:3] + (-1,))
        return np.moveaxis(channels, -1, 0)
    raise ScanError(path, f"{data.ndim}-dimensional data is not supported", "store one 3D volume (optionally with a 4th channel axis) per file")
