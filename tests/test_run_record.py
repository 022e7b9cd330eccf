"""The run tells you what it did (issue #19 item 5): every case's role, learning curves a
killed run still has, and progress lines where there is no terminal."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import medseg.training.loop
from medseg.config import TrainConfig
from medseg.evaluation.plots import plot_learning_curves
from medseg.files import TMP_MARKER
from medseg.training.checkpoint import load_checkpoint
from medseg.training.loop import train
from medseg.training.progress import Progress, duration

from conftest import tiny_em_config, write_em_pairs

PROGRESS = "medseg.training.progress"


@pytest.fixture(scope="module")
def em(tmp_path_factory) -> Path:
    """s0-s5 labelled, and a cases.csv that adds an unlabelled image."""
    root = tmp_path_factory.mktemp("record")
    write_em_pairs(root, slices=6)
    (root / "extra.png").write_bytes((root / "images" / "s5.png").read_bytes())
    rows = [f"images/s{k}.png,labels/s{k}.png" for k in range(6)] + ["extra.png,"]
    (root / "cases.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return root


def test_split_json_names_every_case_in_exactly_one_role(em, tmp_path):
    data = {"images": None, "labels": None, "csv": str(em / "cases.csv")}
    config = tiny_em_config(em, tmp_path, "roles", epochs=1, steps_per_epoch=1, data=data)
    run = train(config, progress=False).run_dir
    split = json.loads((run / "split.json").read_text())
    assert split["train"] == ["s0", "s1", "s2", "s3"] and split["val"] == ["s4"]
    assert split["unused"] == ["s5"]  # labelled, but the cases split lists it nowhere
    assert split["unlabelled"] == ["extra"]
    roles = [split[r] for r in ("train", "val", "unused", "unlabelled")]
    named = [case for role in roles for case in role]
    assert sorted(named) == sorted(["s0", "s1", "s2", "s3", "s4", "s5", "extra"]) and len(named) == len(set(named))


def test_a_run_stopped_by_an_exception_keeps_its_curves_up_to_the_last_epoch(em, tmp_path, monkeypatch):
    real = medseg.training.loop.train_one_epoch
    calls = []

    def fails_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in epoch 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(medseg.training.loop, "train_one_epoch", fails_in_epoch_3)
    config = tiny_em_config(em, tmp_path, "killed", epochs=5, steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="injected"):
        train(config, progress=False)
    run = tmp_path / "killed"
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(r["dice_cell"] for r in rows)
    record = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in record["epochs"]] == [1, 2]
    assert record["score"] == "mean_dice" and record["best_epoch"] in (1, 2)
    assert record["best"]["mean_dice"] == max(r["mean_dice"] for r in record["epochs"])
    history = load_checkpoint(run / "latest.pt").training.history
    assert len(history) == 2
    for saved, row in zip(history, record["epochs"]):
        assert row == {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in saved.items()}
    # The PNG is the plot of exactly those two epochs.
    plot_learning_curves(history, tmp_path / "two_epochs.png")
    assert (run / "learning_curves.png").read_bytes() == (tmp_path / "two_epochs.png").read_bytes()
    assert not [p for p in run.rglob("*") if TMP_MARKER in p.name]


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_every_n_seconds_or_steps_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS)
    clock = _Clock()
    progress = Progress(10, bar=False, every_steps=None, every_seconds=5.0, now=clock)
    for _ in range(10):
        clock.t += 2.0  # a step every 2 s: a line at steps 3, 6, 9 (6 s since the last line each)
        progress.step(0.5, 1e-3)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["step 3/10", "step 6/10", "step 9/10"]
    assert lines[0] == "step 3/10: loss 0.5000, lr 1.00e-03, 0.50 steps/s, 14 s left"
    caplog.clear()
    progress = Progress(7, bar=False, every_steps=3, every_seconds=1000.0, now=clock)
    for _ in range(7):
        progress.step(0.25, 1e-3)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 3/7", "step 6/7"]
    caplog.clear()
    progress.epoch({"epoch": 1, "train_loss": 0.25})
    assert [r.getMessage() for r in caplog.records] == ["epoch 1: train_loss=0.25"]


def test_a_terminal_gets_a_bar_and_no_lines_other_ranks_get_nothing(caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    train = TrainConfig(log_every_steps=1)
    bar = Progress.for_run(None, True, 3, train, stream=terminal)
    silent = Progress.for_run(None, False, 3, train, stream=pipe)
    for progress in (bar, silent):
        for _ in range(3):
            progress.step(0.5, 1e-3)
        progress.epoch({"epoch": 1, "train_loss": 0.5})
        progress.close()
    assert "3/3" in terminal.getvalue() and "loss=0.5000" in terminal.getvalue()
    assert not caplog.records and pipe.getvalue() == ""
    assert Progress.for_run(None, True, 3, train, stream=pipe).bar.disable  # a pipe: lines, not a bar


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7500)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 05 min",
    ]


def test_training_without_a_terminal_logs_progress_lines(em, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: progress=None picks lines
    config = tiny_em_config(em, tmp_path, "lines", epochs=1, steps_per_epoch=4, train={"log_every_steps": 2})
    train(config)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4", "epoch 1"]
    assert "\r" not in sys.stderr.getvalue()  # no bar


def test_medseg_train_piped_to_a_file_shows_progress_lines(em, tmp_path):
    """The command as a batch job runs it: stderr to a file, no terminal anywhere."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: piped\ndata:\n  images: {em / 'images'}\n  labels: {em / 'labels'}\n"
        "  classes: {membrane: 0, cell: 255}\n  split: {mode: cases, train: [s0, s1], val: [s2]}\n"
        "model: {name: unet, spatial_dims: 2, features: 4, depth: 2}\naugment: {enabled: false}\n"
        "train: {epochs: 1, steps_per_epoch: 4, batch_size: 2, patch_size: [32, 32], log_every_steps: 2}\n"
        f"output_dir: {tmp_path / 'runs'}\n"
    )
    with open(tmp_path / "stderr.log", "w") as log_file:
        done = subprocess.run(
            [sys.executable, "-m", "medseg", "train", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    text = (tmp_path / "stderr.log").read_text()
    assert done.returncode == 0, text[-2000:]
    assert "INFO medseg.training.progress: step 2/4: loss " in text and "step 4/4" in text
    assert "INFO medseg.training.progress: epoch 1: " in text and "\r" not in text
