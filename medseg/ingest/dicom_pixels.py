"""A DICOM series' pixels: slices decoded on a thread pool, each written straight into the volume.

Why: the volume used to be built through a list of decoded slices, ``np.stack`` and an int32
(or float) intermediate: four passes over the volume and about six times its size in memory
at the peak (381 MB for a 63 MB CT series of 512x512x120). Here each file's pixel data is
read (from where the planning pass's header read stopped: no header is parsed twice),
decoded, rescaled and written into its place in one preallocated array of the final dtype:
69 MB at the peak (``bench/infer.py --part dicom`` has the times).

Threads: ``default_workers(transfer_syntax)``, each reading and decoding whole files, only
where the decoder releases the GIL: JPEG 2000 and HTJ2K, decoded by imagecodecs' OpenJPEG
(``decode_frame`` below, registered with pydicom as the decoding plugin "medseg-imagecodecs").
Measured on 2 cores (``bench/infer.py --part dicom``), none of pydicom's own decoders
releases it (native, RLE, JPEG 2000 through pylibjpeg-openjpeg or Pillow, JPEG-LS through
pylibjpeg or pyjpegls: 0.95-1.01x on two threads, where zlib gets 2x), and header parsing is
Python, so for every other syntax a second thread only queues on the GIL and costs about 13%
on a native series: those decode in the calling thread.

Decoders: JPEG 2000 through imagecodecs (it releases the GIL; its frames are byte-identical
to pylibjpeg-openjpeg's, the same OpenJPEG library, and pydicom does everything after the
codec: precision, sign correction, YBR_ICT/YBR_RCT as RGB); JPEG-LS through pyjpegls, about
4x faster than pylibjpeg-libjpeg here (94 ms vs 412 ms for 24 slices). ``preferred_plugin``
names them; a file either plugin cannot decode is decoded by pydicom's default choice.

The result is exactly what stacking the decoded slices and rescaling the stack gives:
RescaleSlope 1 with integer intercepts stays integer (int16 when the values fit, else
int32; the stored dtype when every intercept is 0), anything else is float32 computed in
float32; slices of different dtypes promote as ``np.stack`` would. The volume is slice-major
in memory, (slices, rows, columns[, samples]), and returned as the channel-first view
(channels, columns, rows, slices): the memory order of a NIfTI image.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from medseg.errors import ScanError

__all__ = ["PLUGIN", "default_workers", "preferred_plugin", "read_volume"]

# The pydicom decoding plugin (label) this module registers for J2K_SYNTAXES.
PLUGIN = "medseg-imagecodecs"
J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
# pydicom's plugin contract: what the plugin needs, per transfer syntax.
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.1",) for uid in J2K_SYNTAXES}
_PREFERRED = {**{uid: PLUGIN for uid in J2K_SYNTAXES}, JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}

# Decodes slice k (in spatial order): its pixels as a viewer shows them, (rows, columns[,
# samples]), and the note saying how they were converted (None: as stored).
Decode = Callable[[int], "tuple[np.ndarray, str | None]"]

_INT16 = np.iinfo(np.int16)
_FIX = "the file is corrupt or declares the wrong transfer syntax; re-export it"


def default_workers(transfer_syntax: str | None = None) -> int:
    """Threads that decode a series stored in ``transfer_syntax``: one per core (at most 8) where
    the decoder releases the GIL (JPEG 2000 through imagecodecs), else 1."""
    if preferred_plugin(transfer_syntax) != PLUGIN:
        return 1
    return min(8, os.cpu_count() or 1)


def preferred_plugin(transfer_syntax: str | None) -> str:
    """The pydicom decoding plugin to try first for ``transfer_syntax``; "" for pydicom's own choice."""
    plugin = _PREFERRED.get(str(transfer_syntax or ""), "")
    if not plugin:
        return ""
    try:
        return plugin if plugin in get_decoder(transfer_syntax).available_plugins else ""
    except (NotImplementedError, ValueError):
        return ""


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin contract: whether ``decode_frame`` can decode ``transfer_syntax`` here."""
    return transfer_syntax in J2K_SYNTAXES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner) -> bytes:
    """One JPEG 2000 / HTJ2K frame decoded by imagecodecs: pydicom's decoding plugin contract.

    Why: pylibjpeg-openjpeg holds the GIL while it decodes; imagecodecs' OpenJPEG releases it,
    so a series' files decode in parallel (3.1 s on one thread, 1.6 s on two for 120 slices
    of 512x512). The bytes returned are pylibjpeg-openjpeg's for the same codestream (one
    container per sample, 1 or 2 bytes by the codestream's precision, its signedness,
    samples interleaved), and the runner is told what pylibjpeg tells it, so pydicom's
    processing after the codec (sign and precision correction, dtype, reshape) is unchanged.
    Anything else (precision above 16, a component size or count other than the header's)
    raises: the caller then decodes the file with pydicom's default plugin.
    """
    from imagecodecs import jpeg2k_decode

    precision = runner.get_option("j2k_precision", runner.bits_stored)
    signed = bool(runner.get_option("j2k_is_signed", runner.pixel_representation))
    if not 0 < precision <= 16:
        raise ValueError(f"JPEG 2000 precision {precision} is left to pydicom's default decoder")
    samples = runner.samples_per_pixel
    shape = (runner.rows, runner.columns) + ((samples,) if samples > 1 else ())
    expected = np.dtype(("i" if signed else "u") + ("1" if precision <= 8 else "2"))
    frame = jpeg2k_decode(src, numthreads=1)
    if frame.shape != shape or frame.dtype != expected:
        raise ValueError(f"JPEG 2000 frame decoded to {frame.shape} {frame.dtype}, expected {shape} {expected}")
    if runner.photometric_interpretation in ("YBR_ICT", "YBR_RCT"):  # the codestream's component transform undone
        runner.set_option("photometric_interpretation", "RGB")
    runner.set_option("bits_allocated", 8 if precision <= 8 else 16)
    return frame.tobytes()


class _Wider(Exception):
    """A slice decoded to a dtype the volume cannot hold: start again in the promoted dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        super().__init__(str(dtype))
        self.dtype = dtype


def read_volume(
    decode: Decode,
    paths: Sequence[Path],
    rescale: Sequence[tuple[float, float]],
    samples: int,
    workers: int | None = None,
) -> tuple[np.ndarray, set[str | None]]:
    """The volume (channels, columns, rows, slices) and the set of the slices' conversion notes.

    ``paths[k]`` is the file slice k comes from (named by any error), ``rescale[k]`` its
    (RescaleSlope, RescaleIntercept). A ScanError from ``decode`` passes through; any other
    error of a slice becomes a ScanError naming its file, raised in the calling thread.
    When several slices fail, the first in slice order is reported.
    """
    count = len(paths)
    params = np.asarray(rescale, dtype=np.float64).reshape(count, 2)
    workers = max(1, min(workers or default_workers(), count))
    first = _decoded(decode, 0, paths)  # in this thread: its dtype and shape size the volume
    stored = first[0].dtype
    expected = 3 if samples > 1 else 2
    if first[0].ndim != expected or (samples > 1 and first[0].shape[-1] != samples):
        raise ScanError(
            paths[0],
            f"decoded pixel data has shape {first[0].shape}, expected rows x columns"
            + (f" x {samples} samples" if samples > 1 else ""),
            _FIX,
        )
    while True:
        try:
            return _fill(decode, paths, params, samples, workers, stored, first)
        except _Wider as wider:  # rare: files of one series stored with different bit depths
            stored, first = wider.dtype, None


def _decoded(decode: Decode, k: int, paths: Sequence[Path]) -> tuple[np.ndarray, str | None]:
    try:
        return decode(k)
    except (ScanError, MemoryError, OverflowError):  # load() gives the last two their meaning
        raise
    except Exception as exc:
        raise ScanError(paths[k], f"cannot decode pixel data ({type(exc).__name__}: {exc})", _FIX) from exc


def _fill(
    decode: Decode,
    paths: Sequence[Path],
    params: np.ndarray,
    samples: int,
    workers: int,
    stored: np.dtype,
    first: tuple[np.ndarray, str | None] | None,
) -> tuple[np.ndarray, set[str | None]]:
    slopes, intercepts = params[:, 0], params[:, 1]
    integer = bool(np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)))
    if integer and np.all(intercepts == 0):
        kind, dtype = "stored", stored
    elif integer and stored.kind in "iu" and stored.itemsize <= 2 and np.abs(intercepts).max() < 2**30:
        kind, dtype = "wrapped", np.dtype(np.int16)  # stored + intercept modulo 2**16: exact when it fits
    elif integer:
        kind, dtype = "int32", np.dtype(np.int32)
    else:
        kind, dtype = "float", np.dtype(np.float32)
    if first is None:
        first = _decoded(decode, 0, paths)
    volume = np.empty((len(paths), *first[0].shape), dtype=dtype)

    def put(k: int, pixels: np.ndarray) -> tuple[int, int]:
        """Slice k rescaled into its place; the range of its rescaled values (integer kinds)."""
        if pixels.shape != volume.shape[1:]:
            raise ScanError(
                paths[k],
                f"decoded pixel data has shape {pixels.shape}, the series' first slice {volume.shape[1:]}",
                "the header and the pixel data disagree; re-export the series",
            )
        if pixels.dtype != stored and np.result_type(stored, pixels.dtype) != stored:
            raise _Wider(np.result_type(stored, pixels.dtype))
        values = pixels.astype(stored, copy=False)
        out = volume[k]
        if kind == "stored":
            np.copyto(out, values)
            return 0, 0
        if kind == "float":  # values cast to float32, times the slope, plus the intercept: each rounded in float32
            np.multiply(values, np.float32(slopes[k]), out=out, dtype=np.float32, casting="unsafe")
            np.add(out, np.float32(intercepts[k]), out=out)
            return 0, 0
        if kind == "wrapped":  # in int16 arithmetic, modulo 2**16: the stored bits plus the intercept's
            intercept = int(intercepts[k])
            np.add(values, np.int16((intercept + 2**15) % 2**16 - 2**15), out=out, dtype=np.int16, casting="unsafe")
            return int(values.min()) + intercept, int(values.max()) + intercept
        np.add(values.astype(np.int32), intercepts[k : k + 1].astype(np.int32), out=out)
        return int(out.min()), int(out.max())

    def work(k: int, decoded: tuple[np.ndarray, str | None] | None = None) -> tuple[str | None, int, int]:
        pixels, note = decoded if decoded is not None else _decoded(decode, k, paths)
        try:
            lo, hi = put(k, pixels)
        except (ScanError, _Wider, MemoryError):
            raise
        except Exception as exc:
            raise ScanError(paths[k], f"cannot place the decoded slice ({type(exc).__name__}: {exc})", _FIX) from exc
        return note, lo, hi

    results = [work(0, first)]
    results += _run(work, range(1, len(paths)), workers)
    fits = _INT16.min <= min(r[1] for r in results) and max(r[2] for r in results) <= _INT16.max
    if kind == "wrapped" and not fits:
        volume = _widen(volume, stored, intercepts)
    elif kind == "int32" and fits:
        volume = volume.astype(np.int16)
    notes = {r[0] for r in results}
    return (volume.T if samples > 1 else volume.T[None]), notes


def _widen(volume: np.ndarray, stored: np.dtype, intercepts: np.ndarray) -> np.ndarray:
    """int16 slices holding (stored + intercept) modulo 2**16 → the int32 values (stored values recovered exactly)."""
    wide = np.empty(volume.shape, dtype=np.int32)
    bits = np.uint16 if stored.kind == "u" else np.int16
    for k, intercept in enumerate(intercepts.astype(np.int64)):
        back = volume[k].view(np.uint16) - np.uint16(int(intercept) % 2**16)  # wraps back to the stored bits
        np.add(back.view(bits), np.int32(intercept), out=wide[k], dtype=np.int32)
    return wide


def _run(work: Callable[[int], tuple], indices: range, workers: int) -> list:
    """``work`` over ``indices`` in order, on ``workers`` threads; the first error in order stops the rest."""
    if workers == 1 or len(indices) <= 1:
        return [work(k) for k in indices]
    # pydicom's readers silence warnings with warnings.catch_warnings, which is not thread-safe:
    # threads restoring each other's filters could leave them changed. Inside this block every
    # interleaving restores to a list that ignores, and leaving it restores the caller's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-dicom")
        try:
            futures = [pool.submit(work, k) for k in indices]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _register() -> None:
    """``decode_frame`` as pydicom's "medseg-imagecodecs" plugin for J2K_SYNTAXES (once per process).

    Registered last, so pydicom's own order is unchanged for callers that name no plugin.
    """
    for uid in J2K_SYNTAXES:
        try:
            get_decoder(uid).add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # already registered (the module imported again, e.g. reloaded)
            pass


_register()
