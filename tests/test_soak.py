"""Soak: the segment-study flow over 200 small scans of mixed kinds, 10% of them broken.

Exactly the broken scans are reported, every other mask is written, and memory does not
grow from scan to scan (RSS after the last scan within 10% of RSS after scan 20).
Runs in its own process so the RSS is the flow's alone (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.data import phantoms
from medseg.config import config_from_dict
from medseg.training.loop import train

REPO = Path(__file__).resolve().parents[1]

SOAK = r"""
import json, sys, threading
from pathlib import Path
import medseg_flows  # privacy defaults before Prefect
import medseg.export as export
from medseg_flows.segment_study import segment_study

samples, lock = [], threading.Lock()
real_export = export.export_mask

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0

def export_and_measure(*args, **kwargs):
    out = real_export(*args, **kwargs)
    with lock:
        samples.append(rss_mb())
    return out

export.export_mask = export_and_measure  # what medseg.pipeline calls
state = segment_study(input_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]), checkpoint=Path(sys.argv[3]),
                      workers=2, return_state=True)
print(json.dumps({"state": state.name, "rss_mb": samples}))
"""


def _write_scans(root: Path, n: int, broken_every: int) -> set[str]:
    """n scans named case000a.. (not numbered at the end, so none stack), every k-th broken."""
    rng = np.random.default_rng(0)
    em = phantoms.em_phantom(shape=(64, 64, 3), cells=10, seed=1)
    broken = set()
    for i in range(n):
        name = f"case{i:03d}a"
        kind = i % 3
        if i % broken_every == broken_every - 1:
            broken.add(name)
            if kind == 0:
                (root / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(50))
            elif kind == 1:
                (root / f"{name}.nii.gz").write_bytes(b"")
            else:
                data = np.zeros((8, 8, 2), np.float32)
                data[0, 0, 0] = np.nan
                phantoms.write_nifti(data, np.eye(4), root / f"{name}.nii.gz")
            continue
        if kind == 0:
            Image.fromarray(np.ascontiguousarray(em.image[:, :, i % 3].T)).save(root / f"{name}.png")
        elif kind == 1:
            phantoms.write_nifti(em.image.astype(np.float32), np.diag([0.5, 0.5, 2.0, 1.0]), root / f"{name}.nii.gz")
        else:
            phantoms.write_tiff_stack(em.image, em.affine, root / f"{name}.tif")
    return broken


def test_soak_200_scans_ten_percent_broken(tmp_path):
    root = tmp_path / "em"
    data = phantoms.em_phantom(shape=(64, 64, 4), cells=10, seed=2)
    phantoms.write_png_sequence(data.image, root / "images", prefix="s")
    phantoms.write_png_sequence(data.label, root / "labels", prefix="s")
    run = train(
        config_from_dict(
            {
                "name": "soak",
                "data": {
                    "images": str(root / "images"),
                    "labels": str(root / "labels"),
                    "classes": {"membrane": 0, "cell": 255},
                    "split": {"mode": "cases", "train": ["s0", "s1", "s2"], "val": ["s3"]},
                },
                "model": {"name": "unet", "spatial_dims": 2, "features": 4, "depth": 2},
                "augment": {"enabled": False},
                "train": {"epochs": 1, "steps_per_epoch": 5, "batch_size": 2, "patch_size": [32, 32]},
                "output_dir": str(tmp_path / "runs"),
            }
        ),
        progress=False,
    ).run_dir
    scans = tmp_path / "scans"
    scans.mkdir()
    broken = _write_scans(scans, 200, broken_every=10)
    script = tmp_path / "soak.py"
    script.write_text(SOAK)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, str(script), str(scans), str(tmp_path / "out"), str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["state"] == "Failed"  # some scans failed: the run says so, after finishing the rest
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["records"]
    failed = {r["case"] for r in records if r["status"] == "failed"}
    written = {r["case"] for r in records if r["status"] == "written"}
    assert failed == broken
    assert len(written) == 180 and not written & broken
    assert all(r["reason"] for r in records if r["status"] == "failed")
    rss = result["rss_mb"]
    assert len(rss) == 180
    growth = rss[-1] / rss[19] - 1.0
    (tmp_path.parent / "soak_figures.json").write_text(
        json.dumps({"rss_after_20_mb": rss[19], "rss_after_last_mb": rss[-1], "growth": growth})
    )
    print(f"soak: RSS after scan 20 {rss[19]:.0f} MB, after scan 180 {rss[-1]:.0f} MB ({growth:+.1%})")
    assert abs(growth) <= 0.10
