"""Training: learns on phantoms, resumes exactly, runs DDP on two CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import medseg.training.loop
from medseg.data import phantoms
from medseg.training.checkpoint import load_checkpoint
from medseg.cli import main
from medseg.config import TrainConfig, config_from_dict
from medseg.errors import ConfigError, MedsegError
from medseg.models import build_model
from medseg.training.loop import Loss, ema_update, train
from medseg.training.optimization import RunClock


@pytest.fixture(scope="module")
def em_folders(tmp_path_factory) -> Path:
    """Eight 64x64 EM-like slices as image/label PNG folders paired by name."""
    root = tmp_path_factory.mktemp("em")
    em = phantoms.em_phantom(shape=(64, 64, 8), cells=12, seed=0)
    phantoms.write_png_sequence(em.image, root / "images", prefix="case")
    phantoms.write_png_sequence(em.label, root / "labels", prefix="case")
    return root


def _config(root: Path, out: Path, **train):
    settings = {"epochs": 3, "steps_per_epoch": 10, "batch_size": 4, "patch_size": [32, 32], "learning_rate": 0.01}
    settings.update(train)
    return config_from_dict(
        {
            "name": "t",
            "data": {
                "images": str(root / "images"),
                "labels": str(root / "labels"),
                "classes": {"membrane": 0, "cell": 255},
                "split": {"mode": "cases", "train": [f"case{i}" for i in range(6)], "val": ["case6", "case7"]},
            },
            "model": {"name": "unet", "spatial_dims": 2, "features": 8, "depth": 2},
            "augment": {"sigma": 4.0, "rotate_degrees": 20},
            "train": settings,
            "infer": {"sw_batch_size": 8},
            "output_dir": str(out),
        }
    )


def test_short_training_learns_and_checkpoint_loads_safely(em_folders, tmp_path):
    config = _config(em_folders, tmp_path, epochs=4, steps_per_epoch=15)
    result = train(config, progress=False)
    losses = result.step_losses
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    # chance: predicting the majority class everywhere gives membrane Dice 0
    assert result.best_metrics["dice_membrane"] > 0.6 and result.best_metrics["dice_cell"] > 0.85
    payload = torch.load(result.run_dir / "best.pt", weights_only=True)  # plain tensors and values only
    assert payload["format"] == "medseg-checkpoint/2" and "classes" not in payload  # no copies beside the config
    state = load_checkpoint(result.run_dir / "best.pt")
    assert state.classes == {"membrane": 0, "cell": 255}
    assert state.config.model.name == "unet" and state.config.preprocess.intensity == "zscore"
    model = build_model(state.config.model)
    model.load_state_dict(state.weights)
    for name in ("latest.pt", "best.pt", "metrics.csv", "learning_curves.png", "split.json"):
        assert (result.run_dir / name).is_file(), name
    split = json.loads((result.run_dir / "split.json").read_text())  # the run records which cases did what
    assert (split["mode"], split["train"], split["val"]) == (
        "cases",
        [f"case{i}" for i in range(6)],
        ["case6", "case7"],
    )
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "dice_membrane" in header and "pixel_error" in header


def test_resume_continues_exactly(em_folders, tmp_path):
    full = train(_config(em_folders, tmp_path / "a", epochs=2), progress=False)
    first = train(_config(em_folders, tmp_path / "b", epochs=2), progress=False, max_epochs=1)
    assert first.epochs_run == 1
    resumed = train(_config(em_folders, tmp_path / "b", epochs=2), resume=first.run_dir, progress=False)
    assert resumed.epochs_run == 2
    assert abs(resumed.step_losses[0] - full.step_losses[10]) < 1e-6
    assert resumed.step_losses == pytest.approx(full.step_losses[10:], abs=1e-6)
    a = torch.load(full.run_dir / "latest.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "latest.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_moving_average_weights_are_validated_checkpointed_and_resumed(em_folders, tmp_path, monkeypatch):
    def config(out: Path):
        return _config(em_folders, out, epochs=2, steps_per_epoch=1, ema_decay=0.9)

    full = train(config(tmp_path / "a"), progress=False)
    first = train(config(tmp_path / "b"), progress=False, max_epochs=1)
    one = _averaging_state(first.run_dir / "latest.pt")
    validated = []
    real_evaluate = medseg.training.loop.evaluate
    monkeypatch.setattr(
        medseg.training.loop,
        "evaluate",
        lambda model, *a, **k: validated.append(model) or real_evaluate(model, *a, **k),
    )
    resumed = train(config(tmp_path / "b"), resume=first.run_dir, progress=False)
    two = _averaging_state(resumed.run_dir / "latest.pt")
    assert resumed.step_losses == pytest.approx(full.step_losses[1:], abs=1e-6)
    floats = [k for k, v in two["model"].items() if v.is_floating_point()]
    # The first update copies the weights; the second keeps (1 + 1) / (10 + 1) of the average,
    # the warm-up decay, which is below the configured 0.9.
    assert all(torch.equal(one["model"][k], one["training_model"][k]) for k in floats)
    for k in floats:
        expected = (2 / 11) * one["training_model"][k] + (9 / 11) * two["training_model"][k]
        assert torch.allclose(two["model"][k], expected, atol=1e-6), k
    assert not all(torch.equal(two["model"][k], two["training_model"][k]) for k in floats)
    assert two["ema_updates"] == 2
    reference = _averaging_state(full.run_dir / "latest.pt")
    for key in ("model", "training_model"):
        assert all(torch.allclose(reference[key][k].float(), two[key][k].float(), atol=1e-6) for k in floats)
    # What was validated, and what predict loads, is the average.
    assert validated and all(model is resumed.model for model in validated)
    assert all(torch.equal(resumed.model.state_dict()[k], two["model"][k]) for k in floats)


def _averaging_state(path: Path) -> dict:
    """The averaged and raw weights of a checkpoint, and how many updates the average holds."""
    state = load_checkpoint(path)
    return {
        "model": state.weights,
        "training_model": state.training.training_model,
        "ema_updates": state.training.ema_updates,
    }


def test_moving_average_decay_warms_up_to_the_configured_value():
    update = ema_update(0.9)
    averaged, current = [torch.zeros(3), torch.tensor([5])], [torch.ones(3), torch.tensor([7])]
    update(averaged, current, torch.tensor(0))  # decay 1/10: nine tenths of the way
    assert torch.allclose(averaged[0], torch.full((3,), 0.9)) and averaged[1].item() == 7
    averaged = [torch.zeros(3)]
    update(averaged, [torch.ones(3)], torch.tensor(1000))  # warmed up: decay 0.9
    assert torch.allclose(averaged[0], torch.full((3,), 0.1))


def test_resume_keeps_weight_averaging_as_the_run_started(em_folders, tmp_path):
    plain = train(_config(em_folders, tmp_path / "a", epochs=2, steps_per_epoch=1), progress=False, max_epochs=1)
    with pytest.raises(
        MedsegError, match=r"a/t/latest.pt was trained without weight averaging.*--set train.ema_decay=null"
    ):
        train(
            _config(em_folders, tmp_path / "a", epochs=2, steps_per_epoch=1, ema_decay=0.9),
            resume=plain.run_dir,
            progress=False,
        )
    averaged = train(
        _config(em_folders, tmp_path / "b", epochs=2, steps_per_epoch=1, ema_decay=0.9), progress=False, max_epochs=1
    )
    with pytest.raises(
        MedsegError, match=r"b/t/latest.pt was trained with weight averaging.*--set train.ema_decay=0.9"
    ):
        train(_config(em_folders, tmp_path / "b", epochs=2, steps_per_epoch=1), resume=averaged.run_dir, progress=False)


def test_existing_run_is_not_overwritten_silently(em_folders, tmp_path):
    config = _config(em_folders, tmp_path, epochs=1, steps_per_epoch=2)
    train(config, progress=False)
    with pytest.raises(MedsegError, match="already holds a training run"):
        train(config, progress=False)
    assert train(config, progress=False, overwrite=True).epochs_run == 1


def test_train_command(em_folders, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: cli\ndata:\n  images: {em_folders / 'images'}\n  labels: {em_folders / 'labels'}\n"
        "  classes: {membrane: 0, cell: 255}\n  split: {mode: fraction, val_fraction: 0.25}\n"
        "model: {name: unet, spatial_dims: 2, features: 4, depth: 2}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 2, patch_size: [32, 32]}\n"
        "output_dir: runs\n"
    )
    assert main(["train", "--config", str(config), "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "Best epoch 1" in out and str(tmp_path / "runs" / "cli" / "best.pt") in out


def test_training_config_errors_name_the_key(em_folders, tmp_path):
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.out_channels is 3 but data.classes names 2"):
        config_from_dict({"data": {"classes": {"a": 0, "b": 1}}, "model": {"name": "unet", "out_channels": 3}})
    with pytest.raises(ConfigError, match="train.patch_size"):
        config_from_dict({"model": {"name": "unet", "spatial_dims": 3}})
    with pytest.raises(ConfigError, match=r"augment.flip_axes \[2\]: give distinct spatial axes in 0..1"):
        config_from_dict({"model": {"name": "unet"}, "augment": {"flip_axes": [2]}})
    with pytest.raises(ConfigError, match="augment.image_mode bicubic needs model.spatial_dims 2"):
        config_from_dict(
            {
                "model": {"name": "unet", "spatial_dims": 3},
                "train": {"patch_size": [8, 8, 8]},
                "augment": {"image_mode": "bicubic"},
            }
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_train import _config
from medseg.training.loop import train
config = _config(Path({root!r}), Path({out!r}), epochs=1, steps_per_epoch=4, ema_decay={ema_decay!r})
result = train(config, progress=False)
torch.save(result.model.state_dict(), Path({out!r}) / f"rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["raw", "averaged"])
def test_ddp_two_cpu_processes_agree(em_folders, tmp_path, ema_decay):
    """Both ranks hold the same weights after an epoch: the trained ones, or with
    ``ema_decay`` the averaged ones (BatchNorm statistics included)."""
    script = tmp_path / "ddp.py"
    script.write_text(
        DDP_SCRIPT.format(
            tests=str(Path(__file__).parent), root=str(em_folders), out=str(tmp_path), ema_decay=ema_decay
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(tmp_path / "t" / "latest.pt")
    assert len(state.training.rng) == 2  # both ranks' sampler states, for an exact resume
    assert not (tmp_path / "t" / "rank1").exists()


def test_weighted_cross_entropy_with_border_weights_trains(em_folders, tmp_path):
    config = _config(em_folders, tmp_path, epochs=2, steps_per_epoch=8, loss="weighted_ce", border_class="cell")
    result = train(config, progress=False)
    assert result.step_losses[-1] < result.step_losses[0]
    assert all(torch.isfinite(torch.tensor(result.step_losses)))


def test_plain_cross_entropy_loss_trains(em_folders, tmp_path):
    logits, labels = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 1, 8, 8)).float()
    assert Loss("ce")(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels[:, 0].long())))
    config = _config(em_folders, tmp_path, epochs=2, steps_per_epoch=8, loss="ce")
    result = train(config, progress=False)
    assert result.step_losses[-1] < result.step_losses[0]


def test_early_stopping_and_time_budget(em_folders, tmp_path):
    stalled = _config(
        em_folders,
        tmp_path / "a",
        epochs=6,
        steps_per_epoch=2,
        learning_rate=1e-12,
        early_stop_patience=1,
        early_stop_min_delta=0.05,
        schedule="constant",
    )
    result = train(stalled, progress=False)
    assert result.epochs_run == 2  # no improvement after epoch 1: stop after one more
    budget = _config(em_folders, tmp_path / "b", epochs=50, steps_per_epoch=50, time_budget_minutes=0.0001)
    result = train(budget, progress=False)
    assert result.epochs_run == 1 and len(result.step_losses) == 1
    assert (result.run_dir / "best.pt").is_file()  # validated and saved on the way out


@pytest.mark.parametrize("inside", ["images", "labels"])
def test_a_run_folder_inside_the_data_is_refused(em_folders, tmp_path, inside):
    config = _config(em_folders, tmp_path, epochs=1, steps_per_epoch=1)
    config.output_dir = getattr(config.data, inside)
    with pytest.raises(ConfigError, match=f"data.{inside} .* overlap"):
        train(config, progress=False)
    assert not (config.output_dir / config.name).exists()


def test_cpu_time_budget_ignores_waiting_and_a_resume_keeps_the_clock(em_folders, tmp_path):
    """A CPU-time budget buys compute, not minutes of a busy machine: time spent waiting
    (here asleep, on a shared machine descheduled) does not count; and a resumed run cannot
    switch clocks, since wall and CPU seconds do not add up."""
    cpu = RunClock.from_config(TrainConfig(time_budget_minutes=0.01, time_budget_clock="cpu"))
    wall = RunClock.from_config(TrainConfig(time_budget_minutes=0.01))
    time.sleep(0.7)  # the budget is 0.6 s
    assert wall.out_of_time and wall.elapsed >= 0.7
    assert not cpu.out_of_time and cpu.elapsed < 0.3
    while not cpu.out_of_time:  # burn CPU until the budget is spent
        sum(range(10_000))
    assert cpu.fraction(0) == 1.0

    run = train(
        _config(em_folders, tmp_path / "c", epochs=2, steps_per_epoch=1, time_budget_clock="cpu"),
        progress=False,
        max_epochs=1,
    )
    with pytest.raises(MedsegError, match=r"c/t/latest.pt counted its time budget in cpu time.*time_budget_clock=cpu"):
        train(_config(em_folders, tmp_path / "c", epochs=2, steps_per_epoch=1), resume=run.run_dir, progress=False)


def test_validation_slides_the_windows_prediction_will_use(em_folders, tmp_path, monkeypatch):
    """Validation scores what `medseg predict` does: infer.roi_size when set, else the training patch."""
    seen = []
    real = medseg.training.loop.sliding_window_inference

    def spy(inputs, roi_size, *args, **kwargs):
        seen.append(list(roi_size))
        return real(inputs, roi_size, *args, **kwargs)

    monkeypatch.setattr(medseg.training.loop, "sliding_window_inference", spy)
    config = _config(em_folders, tmp_path / "a", epochs=1, steps_per_epoch=1)
    train(config, progress=False)
    assert seen and all(size == [32, 32] for size in seen)
    seen.clear()
    config = config.model_copy(update={"name": "b", "infer": config.infer.model_copy(update={"roi_size": [64, 64]})})
    train(config, progress=False)
    assert seen and all(size == [64, 64] for size in seen)
