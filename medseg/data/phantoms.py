"""Small deterministic labelled studies for tests and the demo.

A CT-like volume (body, liver, kidney, spine) written as a DICOM series or NIfTI, and an
EM-like microscopy stack (cells separated by dark membranes) written as a multi-page TIFF
or a PNG sequence. The known affine of each phantom is the truth the readers must return.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from medseg.geometry import LPS_TO_RAS

__all__ = [
    "Phantom",
    "ct_phantom",
    "em_phantom",
    "rotation",
    "write_dicom_series",
    "write_nifti",
    "write_tiff_stack",
    "write_png_sequence",
    "write_sample_study",
    "write_ct_dataset",
    "ct_dataset_paths",
    "CT_CLASSES",
    "EM_CLASSES",
]

CT_CLASSES = {"background": 0, "liver": 1, "kidney": 2, "spine": 3}
EM_CLASSES = {"membrane": 0, "cell": 255}
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}


@dataclass(frozen=True)
class Phantom:
    """A labelled image with the geometry it was generated on.

    ``image`` and ``label`` have spatial axes in affine order (x, y[, z]), no channel axis.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    classes: dict[str, int]


def rotation(degrees_xyz: Sequence[float]) -> np.ndarray:
    """Rotation matrix from successive rotations about x, y and z (degrees)."""
    ax, ay, az = np.radians(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ct_phantom(
    shape: Sequence[int] = (40, 36, 24),
    spacing: Sequence[float] = (0.9, 1.1, 2.5),
    origin: Sequence[float] = (-20.0, -25.0, -30.0),
    oblique: Sequence[float] | None = None,
    seed: int = 0,
) -> Phantom:
    """CT-like volume in Hounsfield units with liver, kidney and spine labels.

    oblique: rotation angles (degrees about x, y, z) of the voxel grid in the world.
    Structures are placed off-centre so any flip or axis swap shows.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x, y, z = grid

    def ellipsoid(cx: float, cy: float, cz: float, rx: float, ry: float, rz: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    body = ellipsoid(0.0, 0.0, 0.0, 0.9, 0.8, 1.2)
    liver = ellipsoid(-0.35, 0.1, 0.15, 0.35, 0.4, 0.55) & body
    kidney = ellipsoid(0.45, -0.25, -0.2, 0.15, 0.22, 0.3) & body
    spine = (((x - 0.05) / 0.12) ** 2 + ((y + 0.55) / 0.12) ** 2 <= 1.0) & body
    label = np.zeros(shape, dtype=np.uint8)
    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    for value, mask, density in ((1, liver, 90.0), (2, kidney, 160.0), (3, spine, 700.0)):
        label[mask] = value
        hu[mask] = density
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0.0, 12.0, size=shape)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.eye(4)
    direction = rotation(oblique) if oblique is not None else np.eye(3)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return Phantom(image=image, label=label, affine=affine, classes=dict(CT_CLASSES))


def em_phantom(shape: Sequence[int] = (128, 96, 5), cells: int = 30, seed: int = 0) -> Phantom:
    """EM-like stack (x, y, z): bright cells separated by dark membranes (label 0), cells 255."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    seeds = rng.uniform([0, 0], [nx, ny], size=(cells, 2))
    drift = rng.normal(0.0, 1.5, size=(cells, 2))
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    image = np.zeros(shape, dtype=np.uint8)
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(nz):
        points = seeds + k * drift
        d = np.sqrt((xx[..., None] - points[:, 0]) ** 2 + (yy[..., None] - points[:, 1]) ** 2)
        two = np.partition(d, 1, axis=-1)[..., :2]
        membrane = (two[..., 1] - two[..., 0]) < 2.5
        lab = np.where(membrane, 0, 255).astype(np.uint8)
        intensity = np.where(membrane, 60.0, 175.0) + rng.normal(0.0, 18.0, size=(nx, ny))
        intensity = ndimage.gaussian_filter(intensity, 1.0)
        image[..., k] = np.clip(intensity, 0, 255).astype(np.uint8)
        label[..., k] = lab
    affine = np.diag([4e-6, 4e-6, 5e-5, 1.0])  # 4 nm x 4 nm pixels, 50 nm sections, in mm
    return Phantom(image=image, label=label, affine=affine, classes=dict(EM_CLASSES))


def _uid(seed: str) -> str:
    return generate_uid(entropy_srcs=[seed])


def write_dicom_series(
    phantom: Phantom,
    folder: Path,
    *,
    order: Literal["sequential", "reversed", "shuffled"] = "sequential",
    extension: str = ".dcm",
    transfer_syntax: Literal["explicit", "rle", "jpeg2000", "jpegls"] = "explicit",
    rescale_slope: float = 1.0,
    series_uid: str | None = "auto",
    series_description: str = "phantom CT",
    seed: int = 0,
) -> list[Path]:
    """Write ``phantom.image`` as a single-frame CT series; returns files in slice order.

    order names files and sets InstanceNumber in that order (reversed or shuffled against
    the slice position), so readers that trust either get the volume wrong.
    series_uid: 'auto' for a deterministic UID, None to leave SeriesInstanceUID blank.
    """
    folder.mkdir(parents=True, exist_ok=True)
    volume = phantom.image
    nz = volume.shape[2]
    lps = np.linalg.inv(LPS_TO_RAS) @ phantom.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    ranks = np.arange(nz)
    if order == "reversed":
        ranks = ranks[::-1]
    elif order == "shuffled":
        ranks = np.random.default_rng(seed).permutation(nz)
    key = f"{seed}-{series_description}-{phantom.image.shape}"
    study, frame = _uid(f"study-{key}"), _uid(f"for-{key}")
    series = _uid(f"series-{key}") if series_uid == "auto" else (series_uid or "")
    intercept = -1024.0
    paths = []
    for k in range(nz):
        ds = _ct_dataset(study, series, frame, _uid(f"sop-{key}-{k}"), series_description)
        ds.InstanceNumber = int(ranks[k]) + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([row_cos, col_cos])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        stored = np.round((volume[:, :, k].T.astype(np.float64) - intercept) / rescale_slope)
        ds.PixelData = np.clip(stored, 0, 65535).astype(np.uint16).tobytes()
        if transfer_syntax != "explicit":
            ds.compress(TRANSFER_SYNTAXES[transfer_syntax])
        path = folder / f"IM{int(ranks[k]) + 1:04d}{extension}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_dataset(study: str, series: str, frame: str, sop: str, description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Medseg"
    ds.PatientID = "PHANTOM-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.Manufacturer = "medseg phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.AcquisitionNumber = 1
    return ds


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write an (x, y, z) array with its RAS affine (sform and qform both set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def write_tiff_stack(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write an (x, y, z) stack as an ImageJ multi-page TIFF with its pixel size in µm."""
    path.parent.mkdir(parents=True, exist_ok=True)
    um = np.linalg.norm(affine[:3, :3], axis=0) * 1000.0
    pages = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # → (z, y, x)
    tifffile.imwrite(
        path,
        pages,
        imagej=True,
        resolution=(1.0 / um[0], 1.0 / um[1]),
        metadata={"spacing": float(um[2]), "unit": "um", "axes": "ZYX"},
    )
    return path


def write_png_sequence(array: np.ndarray, folder: Path, prefix: str = "") -> list[Path]:
    """Write an (x, y, z) uint8/uint16 stack as numbered PNGs 0.png, 1.png, ... (no pixel size)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(array.shape[2]):
        path = folder / f"{prefix}{k}.png"
        Image.fromarray(np.ascontiguousarray(array[:, :, k].T)).save(path)
        paths.append(path)
    return paths


def ct_dataset_paths(folder: Path, cases: int) -> list[tuple[Path, Path]]:
    """The (image, label) paths of each case that `write_ct_dataset` writes, in case order."""
    return [
        (folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz", folder / "labelsTr" / f"case_{i:03d}.nii.gz")
        for i in range(cases)
    ]


def write_ct_dataset(folder: Path, cases: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """CT phantoms in the nnU-Net layout: imagesTr/case_NNN_0000.nii.gz, labelsTr/case_NNN.nii.gz.

    Each case has its own seed, shape jitter and a small random rotation, so a model has
    to learn the structures, not one fixed volume. Files of those names are replaced
    (`medseg data phantom` checks first that none is a user's).
    """
    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(ct_dataset_paths(folder, cases)):
        shape = tuple(int(n) for n in rng.integers([36, 32, 20], [48, 44, 28]))
        angles = tuple(float(a) for a in rng.uniform(-10, 10, size=3))
        case = ct_phantom(shape=shape, oblique=angles, seed=seed * 1000 + i)
        write_nifti(case.image, case.affine, image)
        write_nifti(case.label, case.affine, label)
    return folder / "imagesTr", folder / "labelsTr"


def write_sample_study(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A small mixed study: images/ (DICOM series, NIfTI, TIFF stack, PNG sequence) and
    labels/ (one reference mask per scan, named by the scan's id)."""
    images, labels = folder / "images", folder / "labels"
    ct = ct_phantom(oblique=(12.0, -8.0, 20.0), seed=seed)
    ct2 = ct_phantom(seed=seed + 1)
    em = em_phantom(seed=seed)
    write_dicom_series(ct, images / "ct_series", order="shuffled", extension="", seed=seed)
    write_nifti(ct.label, ct.affine, labels / "ct_series.nii.gz")
    write_nifti(ct2.image, ct2.affine, images / "ct_volume.nii.gz")
    write_nifti(ct2.label, ct2.affine, labels / "ct_volume.nii.gz")
    write_tiff_stack(em.image, em.affine, images / "em_stack.tif")
    write_tiff_stack(em.label, em.affine, labels / "em_stack.tif")
    em2 = em_phantom(shape=(96, 80, 4), seed=seed + 1)
    write_png_sequence(em2.image, images / "em_sequence")
    write_png_sequence(em2.label, labels / "em_sequence")
    (folder / "README.txt").write_text(
        f"medseg sample study, generated {_dt.date.today().isoformat()} by medseg.data.phantoms (seed {seed}).\n"
        "images/: ct_series (oblique CT DICOM series, shuffled file names without extension),\n"
        "ct_volume.nii.gz (CT NIfTI), em_stack.tif (EM TIFF stack), em_sequence/ (EM PNG sequence).\n"
        "labels/: one reference mask per scan. CT classes: liver=1, kidney=2, spine=3; EM: membrane=0, cell=255.\n"
    )
    return {"images": images, "labels": labels}
