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


def em_nifti_scans(folder: Path, names: list[str]) -> None:
    """Small EM volumes (40x40x2) as NAME.nii.gz: scans the tiny EM model segments in a fraction of a second."""
    em = phantoms.em_phantom(shape=(40, 40, 2), cells=6, seed=2)
    for name in names:
        phantoms.write_nifti(em.image, em.affine, folder / f"{name}.nii.gz")


def series_with_numbers(folder: Path, numbers: list[str]) -> None:
    """Several CT series in one folder, each SeriesNumber as given (untrusted text where IS belongs)."""
    import pydicom

    for k, number in enumerate(numbers):
        paths = phantoms.write_dicom_series(
            phantoms.ct_phantom(shape=(16, 16, 3), seed=k), folder / f"tmp{k}", series_description=f"s{k}", seed=k
        )
        for path in paths:
            ds = pydicom.dcmread(path)
            ds[0x00200011] = pydicom.DataElement(0x00200011, "LO", number)
            ds.save_as(path)
            shutil.move(path, folder / f"s{k}_{path.name}")
        (folder / f"tmp{k}").rmdir()


def set_dicom_text(path: Path, **tags: str | None) -> None:
    """Store each tag as the raw text a broken writer leaves (pydicom would refuse 'nan' as a DS); None deletes it."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, text in tags.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if text is None:
            del ds[tag]
        else:
            ds[tag] = pydicom.DataElement(tag, "LO", text)
    ds.save_as(path)


def nifti_with_fields(path: Path, **fields) -> Path:
    """A 4x4x4 NIfTI-1 whose header fields are then overwritten as stored bytes (no nibabel fixing);
    ``pixdimN=value`` sets one pixdim entry."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    for name, value in fields.items():
        if name.startswith("pixdim"):
            pixdim = header["pixdim"].copy()
            pixdim[int(name[-1])] = value
            header["pixdim"] = pixdim
        else:
            header[name] = value
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def checkpoint_v1_payload(state, **changes) -> dict:
    """The dict medseg wrote before checkpoint schema 2 (classes and preprocessing beside the config),
    from a loaded Checkpoint ``state``; ``changes`` replace entries."""
    payload = {
        "format": "medseg-checkpoint/1",
        "medseg_version": "0.1.0",
        "config": state.config.dump(),
        "classes": state.classes,
        "preprocess": state.config.preprocess.model_dump(mode="json"),
        "model": state.weights,
    }
    payload.update(changes)
    return payload


CANARY = b"CANARY-5e1f: private text that lives outside every served folder\n"


def canary_forms(data: bytes = CANARY) -> list[bytes]:
    """The canary as it could appear in a page: raw, and base64 at each of the three byte alignments."""
    import base64

    forms = [data.strip()]
    for shift in range(3):
        encoded = base64.b64encode(data[shift:])
        forms.append(encoded[4:-4])  # inner part: independent of what came before or after
    return forms


def assert_no_canary(blob: bytes, where: str) -> None:
    for form in canary_forms():
        assert form not in blob, f"{where} holds the canary ({form[:20]!r}...)"


def one_file_manifest(
    path: Path, url: str, sha256: str = "0" * 64, size: int | None = None, entry: str = "img/a.bin"
) -> Path:
    """A data manifest listing one file ``entry`` of dataset ``tiny``, fetched from ``url``."""
    import csv

    from medseg.data.manifest import COLUMNS

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "size"])
        writer.writeheader()
        writer.writerow(
            {
                "dataset": "tiny",
                "case": "c0",
                "role": "image",
                "path": entry,
                "sha256": sha256,
                "split": "train",
                "source_url": url,
                "licence": "test",
                "size": "" if size is None else size,
            }
        )
    return path


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
def tiny_em_run(tmp_path_factory) -> Path:
    """The run folder of a 2D U-Net of width 8 trained for two steps (seconds): a real checkpoint for
    tests of what surrounds the model (files, folders, reports), shared by the session."""
    from medseg.training.loop import train

    root = tmp_path_factory.mktemp("tiny_em")
    write_em_pairs(root, slices=5)
    return train(tiny_em_config(root, root / "runs", "tiny", epochs=1, steps_per_epoch=2), progress=False).run_dir


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
