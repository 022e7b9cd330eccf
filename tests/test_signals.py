"""SIGINT and SIGTERM stop a medseg command cleanly: one line on how to go on, exit 130 / 143, no traceback.

A scheduler stops a job with SIGTERM and a person with Ctrl+C (SIGINT); either way the
user reads what was kept and the command that continues, not a traceback from inside
PyTorch. The subprocess tests send the signal to a real `python -m medseg` mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_em_config, write_em_pairs
from PIL import Image

from medseg.data import phantoms
from medseg.training.checkpoint import load_checkpoint
from medseg.cli import main

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

TRAIN_CONFIG = """name: sig
data:
  images: {root}/images
  labels: {root}/labels
  classes: {{membrane: 0, cell: 255}}
  split: {{mode: cases, train: [s0, s1, s2, s3], val: [s4]}}
model: {{name: unet, spatial_dims: 2, features: 4, depth: 2}}
augment: {{enabled: false}}
train: {{epochs: 10000, steps_per_epoch: 3, batch_size: 2, patch_size: [32, 32], learning_rate: 0.01}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def em(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    write_em_pairs(root, slices=5)
    return root


@pytest.fixture(scope="module")
def checkpoint(em, tmp_path_factory) -> Path:
    from medseg.training.loop import train

    out = tmp_path_factory.mktemp("signal_runs")
    result = train(tiny_em_config(em, out, "sig", epochs=1, steps_per_epoch=2), progress=False)
    return result.run_dir


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "medseg", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"medseg ended (exit {proc.returncode}) before the signal: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the command to get going")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"medseg did not stop within 60 s of {sig.name}") from None
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_predict_stops_cleanly_and_says_how_to_resume(checkpoint, tmp_path, sig):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    em = phantoms.em_phantom(shape=(256, 256, 30), cells=40, seed=8)
    names = [f"scan_{k:02d}x" for k in range(30)]  # a letter after the number: thirty scans, not one stack
    for k, name in enumerate(names):
        Image.fromarray(np.ascontiguousarray(em.image[:, :, k].T)).save(inputs / f"{name}.png")
    proc = _start("predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out))
    _wait_for(
        lambda: out.is_dir() and any(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()), proc
    )

    code, err = _stop(proc, sig)

    assert code == EXIT[sig], err
    assert "Traceback" not in err, err
    assert "interrupted; rerun the same command to resume: finished masks are kept" in err
    assert str(out) in err.splitlines()[-1]
    finished = [p for p in out.iterdir() if p.suffix == ".png" and not p.name.startswith(".")]
    assert 1 <= len(finished) < len(names)
    for path in finished:  # what the hint promises is kept is whole
        assert np.asarray(Image.open(path)).shape == (256, 256)


def test_train_stops_cleanly_and_names_the_resume_command(em, tmp_path):
    config = tmp_path / "sig.yaml"
    config.write_text(TRAIN_CONFIG.format(root=em, out=tmp_path / "runs"))
    run = tmp_path / "runs" / "sig"
    proc = _start("train", "--config", str(config))
    _wait_for(lambda: (run / "metrics.csv").is_file(), proc)  # epoch 1 is saved

    code, err = _stop(proc, signal.SIGINT)

    assert code == 130, err
    assert "Traceback" not in err, err
    assert f"interrupted; resume with --resume {run}" in err
    assert load_checkpoint(run / "latest.pt").training.epoch >= 1  # what the hint resumes from


def test_train_terminated_before_an_epoch_says_start_again(em, tmp_path):
    config = tmp_path / "sig.yaml"
    config.write_text(
        TRAIN_CONFIG.format(root=em, out=tmp_path / "runs").replace("steps_per_epoch: 3", "steps_per_epoch: 100000")
    )
    proc = _start("train", "--config", str(config))
    started: list[str] = []

    def training() -> bool:  # the log line train() writes once the model is built
        line = proc.stderr.readline()
        started.append(line)
        return "training on" in line

    _wait_for(training, proc)

    code, err = _stop(proc, signal.SIGTERM)

    assert code == 143, "".join(started) + err
    assert "Traceback" not in err, err
    assert "interrupted before the first epoch was saved" in err and "rerun the same command" in err
    assert not (tmp_path / "runs" / "sig" / "latest.pt").exists()


def test_sigterm_in_process_returns_143_and_restores_the_handler(tmp_path, monkeypatch, capsys):
    """main() called in-process (tests, Prefect) turns SIGTERM into exit 143, then puts the old handler back."""
    import medseg.cli.config as config_command

    def terminated_mid_command(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(config_command, "run", terminated_mid_command)
    assert main(["config", str(tmp_path / "any.yaml")]) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert err == "medseg config: interrupted; rerun the same command to start again (SIGTERM)\n"


def test_sigterm_swallowed_by_a_command_still_exits_143(tmp_path, monkeypatch, capsys):
    """`medseg view` catches KeyboardInterrupt to stop its server and return 0; SIGTERM must still read as 143."""
    import medseg.cli.config as config_command

    def stops_quietly(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            return 0
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(config_command, "run", stops_quietly)
    assert main(["config", str(tmp_path / "any.yaml")]) == 143
    assert "(SIGTERM)" in capsys.readouterr().err
