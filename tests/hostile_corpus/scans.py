"""Classes 4, 5 and 6 of issue #15: one scan's failure is that scan's, budgets before bytes, sane geometry."""

from __future__ import annotations

import errno
import os

import numpy as np
from PIL import Image
from test_budgets import (
    write_deflate_tiff,
    write_native_multiframe,
    write_nifti_gzip_bomb,
    write_nifti_with_dims,
    write_png_bomb,
    write_rle_dicom,
)
from test_geometry_sanity import DICOM_CASES, NIFTI_CASES
from test_hostile import CORPUS as SCAN_CORPUS
from test_hostile import act_load

from conftest import em_nifti_scans, nifti_with_fields, set_dicom_text
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import predict, slug, went_on
from medseg.data import phantoms


# ============================================================================ 4. one scan's failure is that scan's

# Where a scan-level hostile input of test_hostile belongs instead of class 4.
SCAN_CLASS = {
    "gigantic declared dimensions": 5,
    "decompression bomb PNG": 5,
    "degenerate orientation": 6,
    "NIfTI singular affine": 6,
    "gantry tilt": 6,
    "mixed orientations": 6,
}


def scan_in_afinished_batch(hostile):
    """test_hostile's input beside a good scan: `medseg predict` fails it alone, naming the file and the problem."""

    def build(w: World) -> Run:
        target = hostile.build(w.inputs)
        em_nifti_scans(w.inputs, ["good"])
        says = ("FAILED", hostile.message, hostile.names_file or target.name)
        return Run(predict(w), w.out, 1, says=says, after=went_on(w, "good.nii.gz"))

    return build


def unexpected_error(w: World) -> Run:
    from medseg.inference.predictor import Predictor

    em_nifti_scans(w.inputs, ["a", "b", "c"])
    real = Predictor.predict

    def predict_(self, scan, probabilities=False):
        if scan.ref.id == "b":
            raise KeyError("something nobody planned for")
        return real(self, scan, probabilities)

    def logged() -> None:
        went_on(w, "a.nii.gz", "c.nii.gz")()
        assert "something nobody planned for" in (w.out / "logs" / "b.traceback.txt").read_text()

    return Run(
        predict(w),
        w.out,
        1,
        says=("FAILED b: unexpected KeyError", str(w.out / "logs" / "b.traceback.txt")),
        patches=[(Predictor, "predict", predict_)],
        after=logged,
    )


def input_vanishes(w: World) -> Run:
    import medseg.pipeline.scan as scan_module

    em_nifti_scans(w.inputs, ["gone", "kept"])
    real = scan_module.load

    def load(ref, options):
        if ref.id == "gone":
            raise OSError(errno.ENOENT, "No such file or directory", str(ref.path))
        return real(ref, options)

    return Run(
        predict(w),
        w.out,
        1,
        says=("FAILED gone", "gone.nii.gz", "No such file"),
        patches=[(scan_module, "load", load)],
        after=went_on(w, "kept.nii.gz"),
    )


def other_channels(w: World) -> Run:
    from medseg.training.checkpoint import load_checkpoint, save_checkpoint

    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(w.inputs / "colour.png")
    em_nifti_scans(w.inputs, ["grey"])
    state = load_checkpoint(w.model)
    state.config.data.color = "channels"
    save_checkpoint(state, w.root / "m.pt")
    return Run(
        predict(w, ckpt=w.root / "m.pt"),
        w.out,
        1,
        says=("FAILED colour", "colour.png", "3 channel(s) but the model takes 1"),
        after=went_on(w, "grey.nii.gz"),
    )


def special_files_in_input(w: World) -> Run:
    em_nifti_scans(w.inputs, ["good"])
    os.mkfifo(w.inputs / "pipe.nii.gz")
    (w.inputs / "zero.dcm").symlink_to("/dev/zero")
    return Run(predict(w), w.out, 0, says=("1 written",), after=went_on(w, "good.nii.gz"))


def input_is_a_pipe(w: World) -> Run:
    os.mkfifo(w.inputs / "pipe.nii.gz")
    return Run(["info", str(w.inputs / "pipe.nii.gz")], None, 1, says=("pipe.nii.gz", "not a regular file"))


def empty_input(w: World) -> Run:
    (w.inputs / "nothing").mkdir()
    return Run(predict(w, inputs=w.inputs / "nothing"), None, 1, says=("nothing", "holds no scan"))


ONE_SCAN = [
    Case("unexpected-error", 4, "predict", unexpected_error),
    Case("input-vanishes", 4, "predict", input_vanishes),
    Case("other-channel-count", 4, "predict", other_channels),
    Case("pipe-and-device-in-input", 4, "predict", special_files_in_input),
    Case("input-is-a-pipe", 4, "info", input_is_a_pipe),
    Case("empty-input-folder", 4, "predict", empty_input),
]
SCAN_CASES = [
    Case(slug(h.name), SCAN_CLASS.get(h.name, 4), "predict", scan_in_afinished_batch(h))
    for h in SCAN_CORPUS
    if h.action is act_load and h.name != "empty folder"
]


# ============================================================================ 5. budgets before bytes

BOMBS = [  # (name, builder, --memory-budget MB or None for the default, fragment of the refusal)
    ("gzip-nifti-512-cubed", lambda r: write_nifti_gzip_bomb(r / "bomb.nii.gz", (512, 512, 512)), 16, "134 MB"),
    ("rle-dicom-65535-squared", lambda r: write_rle_dicom(r / "ct" / "bomb.dcm", 65535, 65535), None, "8.59 GB"),
    (
        "rle-multiframe-4096-squared-x3000",
        lambda r: write_rle_dicom(r / "ct" / "bomb.dcm", 4096, 4096, frames=3000, stored_frames=3000),
        None,
        "101 GB",
    ),
    ("zlib-tiff-12000-squared", lambda r: write_deflate_tiff(r / "bomb.tif", 12000, 12000), 32, "144 MB"),
    ("png-6000-squared-rgba", lambda r: write_png_bomb(r / "bomb.png", 6000, 6000), 32, "144 MB"),
]


def bomb(build, budget_mb: float | None, fragment: str, command: str):
    """A small file declaring a huge image, in a fresh process: refused from its header, the peak RSS measured."""

    def run(w: World) -> Run:
        path = build(w.inputs)
        assert path.stat().st_size < 1_000_000
        extra = [] if budget_mb is None else ["--memory-budget", str(budget_mb)]
        benign = w.fixture("benign")
        if command == "info":
            argv, baseline, out = ["info", str(path), *extra], ["info", str(benign["nifti"])], None
        else:
            em_nifti_scans(w.inputs, ["good"])
            argv = predict(w, *extra)
            baseline = predict(w, inputs=benign["nifti"].parent, out=benign["out"])
            out = w.out
        return Run(
            argv,
            out,
            1,
            says=(path.name, fragment, "--memory-budget"),
            process=True,
            rss_mb=budget_mb or 64,
            baseline=baseline,
        )

    return run


def decompression_bomb(w: World) -> Run:
    target = next(h for h in SCAN_CORPUS if h.name == "decompression bomb PNG").build(w.inputs)
    benign = w.fixture("benign")["nifti"]
    return Run(
        ["info", str(target)],
        None,
        1,
        says=(target.name, "safety limit"),
        process=True,
        rss_mb=64,
        baseline=["info", str(benign)],
    )


def nifti_dims_overflow(dims, shown):
    def build(w: World) -> Run:
        path = write_nifti_with_dims(w.inputs / "wide.nii", dims)
        return Run(["info", str(path)], None, 1, says=("wide.nii", shown, "NIfTI-2"))

    return build


def native_frames(frames: int):
    def build(w: World) -> Run:
        path = write_native_multiframe(w.inputs / "ct" / "mf.dcm", frames)
        return Run(["info", str(path)], None, 1, says=("mf.dcm", "the header declares"))

    return build


def resample_explosion(w: World) -> Run:
    from medseg.config import config_from_dict
    from medseg.models import build_model
    from medseg.training.checkpoint import Checkpoint, save_checkpoint

    config = config_from_dict(
        {
            "data": {"classes": {"background": 0, "organ": 1}},
            "preprocess": {"orientation": "RAS", "spacing": [0.5, 0.5, 0.5]},
            "model": {"name": "unet", "spatial_dims": 3, "features": 4, "depth": 2},
            "train": {"patch_size": [16, 16, 16]},
        }
    )
    save_checkpoint(Checkpoint(config, build_model(config.model).state_dict()), w.root / "m.pt")
    volume = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    phantoms.write_nifti(volume, np.diag([40.0, 40.0, 40.0, 1.0]), w.inputs / "coarse.nii.gz")
    phantoms.write_nifti(volume, np.diag([0.5, 0.5, 0.5, 1.0]), w.inputs / "fine.nii.gz")
    return Run(
        predict(w, "--memory-budget", "256", ckpt=w.root / "m.pt"),
        w.out,
        1,
        says=("FAILED coarse", "coarse.nii.gz", "resampling", "--memory-budget"),
        after=went_on(w, "fine.nii.gz"),
    )


BUDGETS = [
    *(
        Case(f"{name}-info", 5, "info", bomb(build, budget, fragment, "info"))
        for name, build, budget, fragment in BOMBS
    ),
    Case("gzip-nifti-in-a-batch", 5, "predict", bomb(BOMBS[0][1], 16, "134 MB", "predict")),
    Case("png-60000-squared-declared", 5, "info", decompression_bomb),
    *(
        Case(f"nifti1-dims-{slug(str(d))}", 5, "info", nifti_dims_overflow(d, s))
        for d, s in [((40000, 4, 4), "dim[1] is -25536"), ((4, 65535, 4), "dim[2] is -1")]
    ),
    *(Case(f"native-multiframe-{f}-frames", 5, "info", native_frames(f)) for f in (10**6, 2**31 - 1)),
    Case("resampling-explosion", 5, "predict", resample_explosion),
]


# ============================================================================ 6. geometry is finite and sane


def dicom_geometry(keyword: str, text: str, message: str, command: str):
    def build(w: World) -> Run:
        paths = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(8, 8, 3)), w.inputs / "ct")
        for path in paths:
            set_dicom_text(path, **{keyword: text})
        if command == "info":
            return Run(["info", str(w.inputs)], None, 1, says=(paths[0].name, message))
        em_nifti_scans(w.inputs, ["good"])
        return Run(predict(w), w.out, 1, says=("FAILED ct", message), after=went_on(w, "good.nii.gz"))

    return build


def nifti_geometry(fields: dict, message: str):
    def build(w: World) -> Run:
        path = nifti_with_fields(w.inputs / "vol.nii", **fields)
        return Run(["info", str(path)], None, 1, says=("vol.nii", message))

    return build


GEOMETRY = [
    *(Case(f"dicom-{slug(k)}-{slug(t)}", 6, "info", dicom_geometry(k, t, m, "info")) for k, t, m in DICOM_CASES),
    *(
        Case(f"dicom-{slug(k)}-{slug(t)}", 6, "predict", dicom_geometry(k, t, m, "predict"))
        for k, t, m in DICOM_CASES[:3:2]
    ),
    *(Case(f"nifti-{slug(name)}", 6, "info", nifti_geometry(fields, m)) for name, fields, m in NIFTI_CASES),
]
