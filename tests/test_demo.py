"""`medseg demo` end to end, as a newcomer runs it (reduced training: --quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np

from medseg.ingest import discover, load


def test_demo_runs_the_whole_pipeline(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "demo", "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "review page:" in done.stdout and "flow run Completed" in done.stdout
    report = json.loads((out / "demo.json").read_text())
    assert [b["name"] for b in report["batches"]] == ["ct", "em"]
    for batch in report["batches"]:
        assert batch["ok"] and batch["counts"] == {"written": 2, "skipped": 0, "failed": 0}
        assert (out / "results" / batch["name"] / "review.html").is_file()
        metrics = json.loads((out / "results" / batch["name"] / "metrics.json").read_text())
        assert len(metrics["cases"]) == 2
    assert report["batches"][1]["mean_dice"]["membrane"] > 0.8  # the EM model learned
    assert report["batches"][0]["mean_dice"]["liver"] > 0.5  # the CT model found the liver
    # the DICOM mask overlays its series: same grid as the scan medseg reads
    scan = load(discover(out / "study" / "ct" / "images" / "patient1_ct").scans[0])
    mask = nib.load(out / "results" / "ct" / "patient1_ct.nii.gz")
    assert np.abs(mask.affine - scan.geometry.affine).max() < 1e-4
    assert mask.shape == scan.geometry.shape
    assert (out / "results" / "ct" / "patient1_ct.seg.dcm").is_file()
    assert (out / "results" / "em" / "em_sequence.tif").is_file()
