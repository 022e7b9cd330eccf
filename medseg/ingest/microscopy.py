"""Microscopy images: multi-page TIFF stacks, single PNG/TIFF/JPEG images, numbered sequences.

Arrays come out channel first with spatial axes (x, y[, z]) like every other scan, so a
2D model slices along the last axis whatever the source. Pixel size comes from OME-XML,
ImageJ metadata or the TIFF resolution tags (PNG: the pHYs chunk) and is stored in mm; when a
file carries none, the pixel size is 1 and the geometry says it is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from medseg.errors import ScanError
from medseg.files import natural_key
from medseg.geometry import Geometry, check_geometry, check_values
from medseg.ingest.budget import check_budget, format_size, pil_nbytes, tiff_nbytes
from medseg.ingest.scan import LoadOptions, Scan, ScanRef

__all__ = ["load_tiff", "load_image", "load_image_sequence", "natural_key", "tiff_pages"]

# mm per unit
_UNITS = {
    "mm": 1.0,
    "millimeter": 1.0,
    "cm": 10.0,
    "centimeter": 10.0,
    "m": 1000.0,
    "meter": 1000.0,
    "um": 1e-3,
    "µm": 1e-3,
    "\u03bcm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "nm": 1e-6,
    "nanometer": 1e-6,
    "pm": 1e-9,
    "\u00c5": 1e-7,  # OME writes the angstrom as Å
    "angstrom": 1e-7,
    "inch": 25.4,
    "in": 25.4,
}

_GREY = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def tiff_pages(path: Path) -> int:
    """Number of image planes in a TIFF's first series (1 for a single image)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            return int(np.prod([n for n, a in zip(series.shape, axes) if a not in "YXS C"], dtype=np.int64) or 1)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise ScanError(path, f"not a readable TIFF file ({exc})", "check that the file is complete") from exc


def _color(array: np.ndarray, options: LoadOptions, has_alpha: bool, rgb: bool) -> tuple[np.ndarray, list[str]]:
    """Colour samples → grey or RGB channels as configured.

    Only colour samples (PNG modes, TIFF 'S' axis) are touched: a TIFF channel axis ('C',
    e.g. fluorescence) keeps every channel as it is.
    """
    notes = []
    c = array.shape[0]
    if has_alpha and c in (2, 4):  # grey+alpha or RGBA
        array = array[: c - 1]
        notes.append("alpha channel dropped")
        c -= 1
    if rgb and c == 3 and options.color == "grey":
        # One channel at a time: 3 float32 temporaries of the whole image at once cost a PNG near
        # Pillow's limit 2.8 GB; this holds one (same sums, same order, same float32 values).
        grey = np.zeros((1,) + array.shape[1:], dtype=np.float32)
        for channel in range(3):
            grey[0] += array[channel] * _GREY[channel]
        array = grey
        notes.append("RGB converted to grey")
    return array, notes


def _ome_pixel_size(xml: str) -> tuple[list[float | None], list[str]]:
    """(x, y, z) in mm from OME-XML's first Pixels element; OME's default unit is the micrometre.

    Bio-Formats and most microscope exporters put the pixel size there and nowhere else
    (their resolution tags stay at 72 dpi).
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        return [None, None, None], [f"OME-XML unreadable ({exc}): pixel size not taken from it"]
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return [None, None, None], []
    sizes: list[float | None] = []
    notes: list[str] = []
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m")
        scale = _UNITS.get(unit.strip().lower()) or _UNITS.get(unit.strip())
        size = None
        if value is not None:
            try:
                size = float(value)
            except ValueError:
                notes.append(f"OME PhysicalSize{axis} {value!r} is not a number: ignored")
        if size is not None and scale is None:
            notes.append(f"unknown OME unit {unit!r} for PhysicalSize{axis}: ignored")
            size = None
        sizes.append(size * scale if size is not None and size > 0 and scale is not None else None)
    return sizes, notes


def _tiff_pixel_size(tif: tifffile.TiffFile) -> tuple[float | None, float | None, float | None, list[str]]:
    """(x, y, z) pixel size in mm, None where the file does not say: OME-XML, then ImageJ, then tags."""
    notes: list[str] = []
    if tif.is_ome and tif.ome_metadata:
        ome, notes = _ome_pixel_size(tif.ome_metadata)
        if ome[0] is not None:
            return ome[0], ome[1] if ome[1] is not None else ome[0], ome[2], notes
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    unit_name = str(ij.get("unit", "")).strip().lower().replace("\\u00b5", "µ")
    scale = None
    tags = page.tags
    res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit_name in ("pixel", "pixels", "px"):
        return None, None, None, notes
    if unit_name:
        scale = _UNITS.get(unit_name)
        if scale is None:
            notes.append(f"unknown ImageJ unit {unit_name!r}: pixel size taken as mm")
            scale = 1.0
    elif res_unit == 2:
        scale = 25.4
    elif res_unit == 3:
        scale = 10.0
    sizes: list[float | None] = []
    for tag in ("XResolution", "YResolution"):
        size = None
        if tag in tags and scale is not None:
            num, den = tags[tag].value
            if num and den and not (num == 1 and den == 1 and not unit_name and res_unit == 1):
                size = scale * den / num
        sizes.append(size)
    z = None
    if "spacing" in ij and scale is not None:
        z = float(ij["spacing"]) * scale
    # Plain TIFF writers store 72 (or 96) dpi by default: that is no physical pixel size.
    if not unit_name and res_unit == 2 and sizes[0] is not None and _default_dpi(25.4 / sizes[0]):
        sizes = [None, None]
    return sizes[0], sizes[1], z, notes


def _default_dpi(dpi: float) -> bool:
    """72 and 96 dpi are what writers store when nobody said (PNG rounds 72 to 72.009)."""
    return any(abs(dpi - default) < 0.05 for default in (72.0, 96.0))


def _tiff_series(path: Path, tif: tifffile.TiffFile) -> tuple[np.ndarray, str]:
    """The image data of a TIFF; several same-shaped single-plane series form a stack."""
    series = tif.series
    if len(series) > 1:
        shapes = {(s.shape, s.axes, str(s.dtype)) for s in series}
        if len(shapes) == 1 and set(series[0].axes) <= set("YXS"):
            return np.stack([s.asarray() for s in series]), "Z" + series[0].axes
        raise ScanError(
            path, f"TIFF holds {len(series)} image series of different shapes", "save one image or stack per file"
        )
    data, axes = series[0].asarray(), series[0].axes
    declared = int((tif.imagej_metadata or {}).get("images", 0) or 0)
    planes = int(np.prod([n for n, a in zip(data.shape, axes) if a not in "YXS"], dtype=np.int64))
    if declared > planes:
        raise ScanError(
            path,
            f"ImageJ metadata declares {declared} images but only {planes} could be read",
            "the file is truncated; copy it again",
        )
    return data, axes


def load_tiff(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """Load a (multi-page) TIFF: one 2D image or a z-stack, channels from S or C axes."""
    path = ref.paths[0]
    try:
        with tifffile.TiffFile(path) as tif:
            check_budget(path, tiff_nbytes(tif), f"the TIFF image data ({_series_text(tif)})", options.memory_budget_mb)
            data, axes = _tiff_series(path, tif)
            px, py, pz, notes = _tiff_pixel_size(tif)
    except ScanError:
        raise
    except Exception as exc:  # tifffile and its codecs (zlib, lzw, jpeg...) raise many types
        raise ScanError(
            path,
            f"not a readable TIFF file ({type(exc).__name__}: {exc})",
            "check that the file is complete and really TIFF",
        ) from exc
    array = _tiff_to_channels_first(path, data, axes)
    samples = "S" in axes.upper()
    array, color_notes = _color(array, options, has_alpha=samples, rgb=samples)
    return _microscopy_scan(ref, array, (px, py, pz), notes + color_notes, {"tiff_axes": axes})


def _series_text(tif: tifffile.TiffFile) -> str:
    """Shape, axes and dtype of each series as the tags declare them, for a budget message."""
    parts = [f"shape {tuple(s.shape)} {s.axes} {s.dtype}" for s in tif.series[:3]]
    more = f" and {len(tif.series) - 3} more series" if len(tif.series) > 3 else ""
    return "; ".join(parts) + more


def _tiff_to_channels_first(path: Path, data: np.ndarray, axes: str) -> np.ndarray:
    """Reorder tifffile's axes (e.g. 'ZCYX', 'YXS') into (C, X, Y[, Z])."""
    axes = axes.upper()
    channel_axes = [i for i, a in enumerate(axes) if a in "CS"]
    if len(channel_axes) > 1:
        raise ScanError(
            path, f"TIFF axes {axes!r} have both colour samples and channels", "save one kind of channel axis"
        )
    plane_axes = [i for i, a in enumerate(axes) if a not in "YXCS"]
    if "Y" not in axes or "X" not in axes:
        raise ScanError(path, f"TIFF axes {axes!r} have no Y/X image plane", "save the image as a plain TIFF stack")
    stack_axes = [i for i in plane_axes if data.shape[i] > 1]
    if len(stack_axes) > 1:
        names = "".join(axes[i] for i in stack_axes)
        raise ScanError(
            path,
            f"TIFF has more than one stack axis ({names}, shape {data.shape})",
            "save one z-stack (or time series) per file",
        )
    order = channel_axes + [axes.index("X"), axes.index("Y")] + stack_axes
    rest = [i for i in range(data.ndim) if i not in order]
    arr = np.transpose(data, order + rest).reshape([data.shape[i] for i in order] or [1])
    if not channel_axes:
        arr = arr[None]
    return arr


def _microscopy_scan(
    ref: ScanRef,
    array: np.ndarray,
    sizes: Sequence[float | None],
    notes: list[str],
    metadata: dict,
) -> Scan:
    spatial = array.shape[1:]
    declared = [(axis, size) for axis, size in zip("xyz", sizes[: len(spatial)]) if size is not None]
    if declared:  # a z spacing of a single plane places nothing, so it is not checked
        axes = ", ".join(a for a, _ in declared)
        name = f"pixel size ({axes}) in mm (OME-XML PhysicalSize, ImageJ spacing or resolution tags)"
        check_values(ref.paths, name, [size for _, size in declared], positive=True)
    known = sizes[0] is not None and sizes[1] is not None
    px = sizes[0] or 1.0
    py = sizes[1] or px
    pz = sizes[2] if len(sizes) > 2 and sizes[2] else None
    if not known:
        notes = notes + ["no pixel size in the file: 1 per pixel assumed"]
    if len(spatial) == 3 and pz is None:
        pz = px if known else 1.0
        if known:
            notes = notes + ["no z spacing in the file: taken equal to the x pixel size"]
    spacing = (px, py, pz or 1.0)
    geometry = Geometry.from_spacing(spatial, spacing, spacing_known=known)
    check_geometry(ref.paths, geometry.affine, spatial, f"pixel size {spacing} mm")
    return Scan(ref=ref, array=array, geometry=geometry, modality="SM", metadata=metadata, notes=notes)


def _read_plane(path: Path, options: LoadOptions) -> tuple[np.ndarray, tuple[float | None, float | None], list[str]]:
    """One 2D image (any Pillow/TIFF format) as (C, X, Y) plus its pixel size in mm."""
    if path.suffix.lower() in (".tif", ".tiff"):
        scan = load_tiff(ScanRef(path.stem, "tiff", (path,)), options)
        if scan.array.ndim != 3:
            raise ScanError(
                path,
                f"expected a single image, found a stack of shape {scan.array.shape[1:]}",
                "use one single-plane image per sequence file",
            )
        size = scan.geometry.spacing if scan.geometry.spacing_known else (None, None)
        return scan.array, (size[0], size[1]), []
    try:
        with Image.open(path) as img:
            what = f"the decoded image ({img.size[0]} x {img.size[1]} {img.mode})"
            check_budget(path, pil_nbytes(img, options.palette), what, options.memory_budget_mb)
            img.load()
            mode = img.mode
            dpi = img.info.get("dpi")
            if mode == "P" and options.palette == "indices":
                pass  # a palette mask (VOC style): the indices are the class values
            elif mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode == "1":
                img = img.convert("L")
            alpha = img.mode in ("LA", "RGBA", "PA")
            data = np.asarray(img)
    except Image.DecompressionBombError as exc:
        raise ScanError(
            path,
            f"image too large for Pillow's safety limit ({exc})",
            "save large images as (BigTIFF) TIFF, which medseg reads without that limit",
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ScanError(
            path, f"not a readable image ({exc})", "check that the file is complete and of the format its name says"
        ) from exc
    del img  # Pillow's copy of the pixels; `data` has its own
    array = data.T[None] if data.ndim == 2 else np.transpose(data, (2, 1, 0))
    array, notes = _color(array, options, has_alpha=alpha, rgb=data.ndim == 3)
    array = np.ascontiguousarray(array)  # after the colour step: a grey image is not copied twice
    size: tuple[float | None, float | None] = (None, None)
    if dpi and dpi[0] and dpi[1] and not _default_dpi(float(dpi[0])):
        size = (25.4 / float(dpi[0]), 25.4 / float(dpi[1]))
    return array, size, notes


def load_image(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """A single 2D image (PNG, JPEG, BMP, single-page TIFF)."""
    path = ref.paths[0]
    array, size, notes = _read_plane(path, options)
    return _microscopy_scan(ref, array, size, notes, {"format": path.suffix.lower().lstrip(".")})


def load_image_sequence(ref: ScanRef, options: LoadOptions = LoadOptions()) -> Scan:
    """A numbered sequence of 2D images (naturally sorted) stacked along z."""
    paths = sorted(ref.paths, key=natural_key)
    planes = []
    first_size: tuple[float | None, float | None] = (None, None)
    notes: list[str] = []
    for i, path in enumerate(paths):
        array, size, plane_notes = _read_plane(path, options)
        if i == 0:
            first_size, notes = size, plane_notes
            if len(paths) > 1:  # before the other planes are read: the stack holds one such plane per file
                check_budget(
                    [paths[0].parent],
                    array.nbytes * len(paths),
                    f"the stack of {len(paths)} images of {format_size(array.nbytes)} each",
                    options.memory_budget_mb,
                )
        elif array.shape != planes[0].shape:
            raise ScanError(
                [paths[0], path],
                f"image sequence mixes sizes: {path.name} is {array.shape[1:]} (x, y) with {array.shape[0]} channels, "
                f"{paths[0].name} is {planes[0].shape[1:]} with {planes[0].shape[0]}",
                "put images of one size per folder",
            )
        planes.append(array)
    dtypes = {p.dtype for p in planes}
    stack = np.stack([p.astype(np.result_type(*dtypes)) for p in planes], axis=-1)
    sizes = (first_size[0], first_size[1], None)
    return _microscopy_scan(ref, stack, sizes, notes, {"files": [p.name for p in paths]})
