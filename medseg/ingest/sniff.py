"""What a file really is, from its first bytes rather than its name."""

from __future__ import annotations

from pathlib import Path

__all__ = ["sniff", "suffix_of"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"%PDF", "pdf"),
)


def sniff(path: Path) -> str:
    """Content type of a file: 'dicom', 'nifti', 'png', 'tiff', 'jpeg', 'gzip', 'empty', ... or 'unknown'.

    A DICOM file without the 128-byte preamble is reported as 'unknown'; the DICOM reader
    decides about those.
    """
    with open(path, "rb") as fh:
        head = fh.read(352)
    if not head:
        return "empty"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):  # NIfTI-2 keeps its magic at byte 4
        return "nifti"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return "unknown"


def suffix_of(path: Path) -> str:
    """Lower-case suffix, keeping the compound '.nii.gz'."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()
