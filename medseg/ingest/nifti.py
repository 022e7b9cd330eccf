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
from medseg.geometry import Geometry, check_geometry, check_values
from medseg.ingest.budget import check_budget, nifti_nbytes
from medseg.ingest.scan import LoadOptions, Scan, ScanRef

__all__ = ["load_nifti", "read_nifti_header"]


def read_nifti_header(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI file lazily (header only); ScanError if it is not one."""
    try:
        img = nib.load(str(path))
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        gzip.BadGzipFile,
    ) as exc:
        raise ScanError(
            path, f"not a readable NIfTI file ({exc})", "check that the file is complete and really NIfTI"
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(path, f"{type(img).__name__} is not a NIfTI image", "convert it to NIfTI (.nii.gz)")
    return img


def _raw_header(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Header | nib.Nifti2Header:
    """The header as stored: nibabel's load silently "fixes" a zero pixdim to 1, which would hide it."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            return type(img.header).from_fileobj(fh, check=False)
    except (nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        fix = "check that the file is complete and really NIfTI"
        raise ScanError(path, f"not a readable NIfTI header ({exc})", fix) from exc


def _check_header_geometry(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> None:
    """Refuse dimensions below 1 and voxel sizes that are zero, NaN or Inf, as the file stores them.

    NIfTI-1 keeps each dimension in a signed 16-bit field: a volume with more than 32767
    voxels along an axis wraps to a negative number, which would otherwise surface as an
    OverflowError from the memory map. Tools that take the voxel size from pixdim (ITK,
    and nibabel's qform) would place a zero or non-finite pixdim differently from the
    sform, so a mask could not overlay the scan everywhere.
    """
    raw = _raw_header(path, img)
    dim = [int(v) for v in raw["dim"]]
    ndim = max(0, min(dim[0], 7))
    for axis in range(1, ndim + 1):
        if dim[axis] < 1:
            wrapped = (
                f" (NIfTI-1 stores it as a signed 16-bit number: {dim[axis] + 65536} voxels wrapped around past 32767)"
                if isinstance(img, nib.Nifti1Image) and dim[axis] < 0
                else ""
            )
            fix = (
                "save volumes with more than 32767 voxels along an axis as NIfTI-2 (nibabel.Nifti2Image), or crop them"
                if wrapped
                else "the header is corrupt or the volume empty; re-export it"
            )
            raise ScanError(path, f"header dim[{axis}] is {dim[axis]}{wrapped}: an axis needs at least one voxel", fix)
    spatial = min(ndim, 3)
    check_values(path, f"pixdim[1:{spatial + 1}] (voxel size)", raw["pixdim"][1 : spatial + 1], positive=False)
    zero = [axis for axis in range(1, spatial + 1) if float(raw["pixdim"][axis]) == 0.0]
    if zero:
        shown = ", ".join(f"{float(v):.6g}" for v in raw["pixdim"][1 : spatial + 1])
        raise ScanError(
            path,
            f"pixdim[1:{spatial + 1}] (voxel size) ({shown}) is 0 along axis {', '.join(map(str, zero))}: "
            "a voxel size of zero places no voxel in space",
            "set the voxel size in the header (nibabel: img.header.set_zooms) or re-export the scan",
        )


def _affine_source(img: nib.Nifti1Image | nib.Nifti2Image) -> str:
    """Which header fields the affine nibabel chose came from, with their values."""
    hdr = img.header
    if int(hdr.get("sform_code", 0)) > 0:
        rows = ", ".join(f"{name} {_fmt(hdr[name])}" for name in ("srow_x", "srow_y", "srow_z"))
        return f"the sform ({rows})"
    pixdim = _fmt(hdr["pixdim"][1:4])
    if int(hdr.get("qform_code", 0)) > 0:
        quatern = _fmt([hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"]])
        offset = _fmt([hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"]])
        return f"the qform (quatern_b/c/d {quatern}, qoffset_x/y/z {offset}, pixdim[1:4] {pixdim})"
    return f"pixdim[1:4] {pixdim} (neither sform nor qform is set)"


def _fmt(values: np.ndarray | list) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


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
    _check_header_geometry(path, img)
    affine = np.asarray(img.affine, dtype=np.float64)
    shape = tuple(int(s) for s in img.header.get_data_shape()[:3])
    check_geometry(path, affine, shape + (1,) * (3 - len(shape)), _affine_source(img))
    try:
        _check_declared_size(path, img)
        check_budget(
            path,
            nifti_nbytes(img),
            f"the NIfTI voxel data (shape {tuple(int(s) for s in img.header.get_data_shape())}, "
            f"{img.header.get_data_dtype()})",
            options.memory_budget_mb,
        )
        data = np.asanyarray(img.dataobj)
    except (nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, gzip.BadGzipFile, MemoryError) as exc:
        raise ScanError(
            path, f"cannot read the voxel data ({exc})", "the file is truncated or corrupt; re-export it"
        ) from exc
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
            "series_description": str(
                hdr.get("descrip", b"").tobytes().rstrip(b"\0").decode("latin-1", "replace")
            ).strip()
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
    raise ScanError(
        path,
        f"{data.ndim}-dimensional data is not supported",
        "store one 3D volume (optionally with a 4th channel axis) per file",
    )
