"""Export: a scan's label map written back in the scan's own geometry.

`masks` writes NIfTI / TIFF / PNG and dispatches every format (`export_mask`);
`dicom_seg` and `rtstruct` write the DICOM objects, coded by `seg_coding`. Every writer
goes through the one atomic writer (`medseg.files.atomic_path`) and checks what it wrote.
"""

from medseg.export.masks import (
    CLASS_COLOURS,
    ExportError,
    atomic_path,
    check_output_outside_inputs,
    default_formats,
    export_mask,
    mask_paths,
    spatial_mask,
    write_dicom_seg,
    write_nifti_mask,
    write_png_masks,
    write_rtstruct,
    write_tiff_mask,
)

__all__ = [
    "CLASS_COLOURS",
    "ExportError",
    "atomic_path",
    "check_output_outside_inputs",
    "default_formats",
    "export_mask",
    "mask_paths",
    "spatial_mask",
    "write_dicom_seg",
    "write_nifti_mask",
    "write_png_masks",
    "write_rtstruct",
    "write_tiff_mask",
]
