"""Class 2 of issue #15, a user's file at a mask's name: `medseg predict` never replaces a file medseg did not
write (a manual segmentation named like the scan's mask) unless told to with --overwrite; that scan fails with
one sentence naming the file and the fix, and the rest of the batch is written."""

from __future__ import annotations

from pathlib import Path

from conftest import em_nifti_scans
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import plant_user_files, predict, went_on
from medseg.data import phantoms

REFUSED = ("exists and medseg did not write it", "move it away, or rerun with --overwrite to replace it")


def _em() -> phantoms.Phantom:
    return phantoms.em_phantom(shape=(40, 40, 3), cells=6, seed=2)


def _inputs(w: World, fmt: str) -> tuple[str, Path, str]:
    """Scans ``a`` and ``b`` of the kind whose default masks include ``fmt``: (case, a's mask path, b's mask)."""
    em = _em()
    if fmt == "nifti":
        em_nifti_scans(w.inputs, ["a", "b"])
        return "a", w.out / "a.nii.gz", "b.nii.gz"
    if fmt == "tiff":
        for name in ("a", "b"):
            phantoms.write_tiff_stack(em.image, em.affine, w.inputs / f"{name}.tif")
        return "a", w.out / "a.tif", "b.tif"
    for name in ("a", "b"):  # image sequences: a TIFF and a folder of PNG slices each, a/s/s0.png ...
        phantoms.write_png_sequence(em.image, w.inputs / name, prefix="s")
    return "a/s", w.out / "a" / "s" / "s1.png", "b/s.tif"


def users_file_at_a_mask_name(fmt: str, overwrite: bool = False):
    def build(w: World) -> Run:
        case, mine, other = _inputs(w, fmt)
        plant_user_files(w.out)
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_bytes(b"a manual segmentation medseg never wrote")
        if overwrite:

            def replaced() -> None:
                assert mine.read_bytes() != b"a manual segmentation medseg never wrote"
                went_on(w, other, mine.relative_to(w.out).as_posix())()

            return Run(predict(w, "--overwrite"), w.out, 0, says=("2 written",), may_change=(mine,), after=replaced)
        return Run(predict(w), w.out, 1, says=(f"FAILED {case}: {mine}", *REFUSED), after=went_on(w, other))

    return build


def users_link_at_a_mask_name(w: World) -> Run:
    """A link the user keeps where a mask goes (to their own segmentation beside it): neither is replaced."""
    em_nifti_scans(w.inputs, ["a", "b"])
    w.out.mkdir(parents=True, exist_ok=True)
    (w.out / "manual.nii.gz").write_bytes(b"the user's segmentation")
    (w.out / "a.nii.gz").symlink_to("manual.nii.gz")
    return Run(predict(w), w.out, 1, says=(f"FAILED a: {w.out / 'a.nii.gz'}", *REFUSED), after=went_on(w, "b.nii.gz"))


def users_folder_at_a_png_name(overwrite: bool):
    """A 2D image's PNG mask goes to ``<id>.png``: a folder of the user's there is never replaced, even with
    --overwrite (which replaces files only)."""

    def build(w: World) -> Run:
        for name in ("a", "b"):
            phantoms.write_png_sequence(_em().image[:, :, :1], w.inputs / name, prefix="x")
        folder = w.out / "a" / "x0.png"
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_bytes(b"the user's notes")
        says = (f"FAILED a/x0: {folder}", "is a folder", "medseg never replaces a folder; move it away")
        return Run(predict(w, *["--overwrite"][:overwrite]), w.out, 1, says=says, after=went_on(w, "b/x0.png"))

    return build


OWN_MASKS = [
    Case("users-nifti-at-a-mask-name-survives", 2, "predict", users_file_at_a_mask_name("nifti")),
    Case("users-tiff-at-a-mask-name-survives", 2, "predict", users_file_at_a_mask_name("tiff")),
    Case("users-png-in-a-mask-folder-survives", 2, "predict", users_file_at_a_mask_name("png")),
    Case("users-link-at-a-mask-name-survives", 2, "predict", users_link_at_a_mask_name),
    Case("users-folder-at-a-png-mask-name-survives", 2, "predict", users_folder_at_a_png_name(False)),
    Case("users-folder-at-a-png-mask-name-survives-overwrite", 2, "predict", users_folder_at_a_png_name(True)),
    Case("users-nifti-at-a-mask-name-overwritten-when-asked", 2, "predict", users_file_at_a_mask_name("nifti", True)),
    Case("users-png-at-a-mask-name-overwritten-when-asked", 2, "predict", users_file_at_a_mask_name("png", True)),
]
