"""Shared fixtures: phantoms on disk, tiny EM training setups, and a guard that inputs are never modified."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medseg.data import phantoms

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_em_pairs(root: Path, slices: int, seed: int = 3) -> phantoms.Phantom:
    """64x64 EM phantom slices as images/sK.png and labels/sK.png (membrane 0, cell 255)."""
    em = phantoms.em_phantom(shape=(64, 64, slices), cells=12, seed=seed)
    phantoms.write_png_sequence(em.image, root / "images", prefix="s")
    phantoms.write_png_sequence(em.label, root / "labels", prefix="s")
    return em


def tiny_em_config(root: Path, out: Path, name: str, epochs: int, steps_per_epoch: int, **sections: dict):
    """A 2D U-Net of width 8 that trains on s0-s3 of ``write_em_pairs`` in seconds and
    validates on s4; ``sections`` add settings, e.g. train={"precision": "bf16"}."""
    from medseg.config import config_from_dict

    raw = {
        "name": name,
        "data": {
            "images": str(root / "images"),
            "labels": str(root / "labels"),
            "classes": {"membrane": 0, "cell": 255},
            "split": {"mode": "cases", "train": ["s0", "s1", "s2", "s3"], "val": ["s4"]},
        },
        "model": {"name": "unet", "spatial_dims": 2, "features": 8, "depth": 2},
        "augment": {"enabled": False},
        "train": {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "batch_size": 4,
            "patch_size": [32, 32],
            "learning_rate": 0.01,
        },
        "output_dir": str(out),
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


def snapshot(folder: Path) -> dict[str, tuple[str, float, int]]:
    """sha256, mtime and mode of every file below ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_mode)
    return state


def open_files() -> set[str]:
    """Paths this process holds open (Linux /proc)."""
    fd_dir = Path("/proc/self/fd")
    found = set()
    for fd in fd_dir.iterdir():
        try:
            found.add(os.readlink(fd))
        except OSError:
            continue
    return found


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's (dicom3tools) warnings for ``path``; fails the test on any error; skips without dciodvfy.

    Call it after a test's own read-back checks, so those still run where dciodvfy is absent.
    """
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; `make dicomtools` installs it)")
    # check=False: dciodvfy's exit code says nothing; its Error/Warning lines do
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300, check=False)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    return [line for line in lines if line.startswith("Warning")]


@pytest.fixture
def ct():
    """Axis-aligned CT phantom."""
    return phantoms.ct_phantom()


@pytest.fixture
def oblique_ct():
    return phantoms.ct_phantom(oblique=(25.0, -15.0, 30.0), seed=3)


@pytest.fixture
def sample_study(tmp_path: Path) -> dict[str, Path]:
    return phantoms.write_sample_study(tmp_path / "study")


@pytest.fixture(scope="session")
def ct_model(tmp_path_factory) -> Path:
    """A tiny 3D U-Net trained briefly on CT phantoms, with resampling in its preprocessing.

    Shared by the predict and clinical-data tests: trained once a session."""
    root = tmp_path_factory.mktemp("ct")
    images, labels = phantoms.write_ct_dataset(root / "data", cases=3, seed=7)
    from medseg.config import config_from_dict
    from medseg.training.loop import train

    config = config_from_dict(
        {
            "name": "ct3d",
            "data": {
                "images": str(images),
                "labels": str(labels),
                "classes": phantoms.CT_CLASSES,
                "split": {"mode": "cases", "train": ["case_000", "case_001"], "val": ["case_002"]},
            },
            "preprocess": {"intensity": "ct_window", "orientation": "RAS", "spacing": [1.2, 1.2, 2.5]},
            "model": {
                "name": "unet",
                "spatial_dims": 3,
                "out_channels": 4,
                "features": 8,
                "depth": 2,
                "options": {"dropout": 0.0},
            },
            "augment": {"enabled": False},
            "train": {
                "epochs": 4,
                "steps_per_epoch": 15,
                "batch_size": 2,
                "patch_size": [24, 24, 8],
                "learning_rate": 0.01,
            },
            "infer": {"sw_batch_size": 4},
            "output_dir": str(root / "runs"),
        }
    )
    result = train(config, progress=False)
    return result.run_dir


def enhanced_multiframe(paths: list[Path], out: Path, edit=None) -> Path:
    """A single-frame series (``paths``) converted into one Enhanced (legacy converted) multi-frame file
    at ``out``, as scanners and PACS deliver them; ``edit(dataset)`` may alter it before it is saved."""
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    enhanced = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    if edit is not None:
        edit(enhanced)
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out)
    return out
