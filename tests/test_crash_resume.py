"""Killed runs: no partial output, the next run finishes the rest; training resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.data import phantoms
from medseg.training.checkpoint import load_checkpoint
from medseg.files import JOURNAL_DIR, TMP_MARKER
from medseg.pipeline.ledger import LEDGER_DIR

from conftest import snapshot

CONFIG = """name: crash
data:
  images: {root}/images
  labels: {root}/labels
  classes: {{membrane: 0, cell: 255}}
  split: {{mode: cases, train: [s0, s1, s2, s3], val: [s4]}}
model: {{name: unet, spatial_dims: 2, features: 8, depth: 2}}
augment: {{sigma: 4.0}}
train: {{epochs: 3, steps_per_epoch: 30, batch_size: 4, patch_size: [32, 32], learning_rate: 0.01}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    em = phantoms.em_phantom(shape=(64, 64, 5), cells=12, seed=3)
    phantoms.write_png_sequence(em.image, root / "images", prefix="s")
    phantoms.write_png_sequence(em.label, root / "labels", prefix="s")
    return root


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", *args]


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started, as a killed job loses its whole
    process group (a flow's ephemeral Prefect server would otherwise outlive the test)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_killed_training_resumes_to_the_same_state(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    (tmp_path / "a.yaml").write_text(CONFIG.format(root=data, out=tmp_path / "full"))
    (tmp_path / "b.yaml").write_text(CONFIG.format(root=data, out=tmp_path / "killed"))
    subprocess.run(
        _medseg("train", "--config", str(tmp_path / "a.yaml")), check=True, env=env, capture_output=True, timeout=600
    )

    run = tmp_path / "killed" / "crash"
    proc = subprocess.Popen(
        _medseg("train", "--config", str(tmp_path / "b.yaml")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: (run / "metrics.csv").is_file(), 300, proc)  # epoch 1 is saved
        time.sleep(0.2)  # inside epoch 2 (30 steps of about 0.1 s)
    finally:
        _kill(proc)
    assert load_checkpoint(run / "latest.pt").training.epoch < 3  # killed before the end
    subprocess.run(
        _medseg("train", "--config", str(tmp_path / "b.yaml"), "--resume", str(run)),
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    full = load_checkpoint(tmp_path / "full" / "crash" / "latest.pt")
    resumed = load_checkpoint(run / "latest.pt")
    assert resumed.training.epoch == full.training.epoch == 3
    for key, value in full.weights.items():
        assert torch.allclose(value.float(), resumed.weights[key].float(), atol=1e-6), key
    assert [round(r["train_loss"], 6) for r in resumed.training.history] == [
        round(r["train_loss"], 6) for r in full.training.history
    ]


def test_killed_predict_leaves_no_partial_output_and_next_run_finishes(data, tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(root=data, out=tmp_path / "runs").replace("epochs: 3", "epochs: 1"))
    subprocess.run(_medseg("train", "--config", str(tmp_path / "c.yaml")), check=True, capture_output=True, timeout=600)
    inputs = tmp_path / "in"
    em = phantoms.em_phantom(shape=(256, 256, 10), cells=40, seed=8)
    inputs.mkdir()
    names = [f"scan_{chr(ord('a') + k)}" for k in range(10)]  # not numbered: ten scans, not one stack
    for k, name in enumerate(names):
        Image.fromarray(np.ascontiguousarray(em.image[:, :, k].T)).save(inputs / f"{name}.png")
    before = snapshot(inputs)
    out = tmp_path / "out"
    args = _medseg(
        "predict", "--checkpoint", str(tmp_path / "runs" / "crash"), "--input", str(inputs), "--output", str(out)
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(
            lambda: out.is_dir() and any(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()),
            300,
            proc,
        )
    finally:
        _kill(proc)
    finished = sorted(p for p in out.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    assert 1 <= len(finished) < 10
    for path in finished:  # every mask under its final name is whole
        assert np.asarray(Image.open(path)).shape == (256, 256)
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{10 - len(finished)} written, {len(finished)} skipped" in done.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{name}.png" for name in names] + ["predictions.json", "review", "review.html"]
    )
    assert not [p for p in out.rglob(f"*{TMP_MARKER}*")] and not list((out / JOURNAL_DIR).glob("*"))
    assert snapshot(inputs) == before


FLOW = """
import sys
from pathlib import Path
import medseg_flows  # privacy defaults before Prefect
from medseg_flows.segment_study import segment_study
state = segment_study(input_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]), checkpoint=Path(sys.argv[3]),
                      workers=1, return_state=True)
print("STATE", state.name)
"""


def test_killed_flow_leaves_no_partial_output_and_next_run_redoes_nothing_complete(data, tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(root=data, out=tmp_path / "runs").replace("epochs: 3", "epochs: 1"))
    subprocess.run(_medseg("train", "--config", str(tmp_path / "c.yaml")), check=True, capture_output=True, timeout=600)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    em = phantoms.em_phantom(shape=(256, 256, 8), cells=40, seed=8)
    names = [f"scan_{chr(ord('a') + k)}" for k in range(8)]
    for k, name in enumerate(names):
        Image.fromarray(np.ascontiguousarray(em.image[:, :, k].T)).save(inputs / f"{name}.png")
    script = tmp_path / "flow.py"
    script.write_text(FLOW)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, str(script), str(inputs), str(out), str(tmp_path / "runs" / "crash")]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for(
            lambda: out.is_dir() and any(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()),
            300,
            proc,
        )
    finally:
        _kill(proc)
    finished = sorted(p.stem for p in out.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    recorded = sorted(p.stem for p in (out / LEDGER_DIR).glob("*.json")) if (out / LEDGER_DIR).is_dir() else []
    assert 1 <= len(finished) < 8
    for name in finished:  # every mask under its final name is whole
        assert np.asarray(Image.open(out / f"{name}.png")).shape == (256, 256)
    dead = _dead_pid()
    half = out / f".scan_h.x1y2{TMP_MARKER}.png"  # what a kill mid-write leaves: the part and its journal entry
    half.write_bytes(b"half a mask")
    (out / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    (out / JOURNAL_DIR / "x1y2.json").write_text(
        json.dumps({"tmp": half.name, "pid": dead, "host": socket.gethostname()})
    )
    user = {
        out / ".thesis.partial.docx": b"a user's own file",
        out / ".scan_b.png.1.part.png": b"looks like old litter",
    }
    for path, data in user.items():
        path.write_bytes(data)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert "STATE Completed" in done.stdout, done.stderr[-3000:]
    records = {r["case"]: r["status"] for r in json.loads((out / "predictions.json").read_text())["records"]}
    assert sorted(records) == names
    assert {c for c, s in records.items() if s == "skipped"} == set(recorded)  # complete work is not redone
    assert not half.exists() and not list((out / JOURNAL_DIR).glob("*"))
    assert all(path.read_bytes() == data for path, data in user.items())  # only medseg's own journalled litter goes


def _dead_pid() -> int:
    """The id of a process that has exited (its journal entries are stale)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
