"""The small objects the training loop wires together: best epoch and early stopping, weight
averaging, the single-process face of the distributed helpers, the run folder's guards."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg.config import TrainConfig
from medseg.errors import MedsegError
from medseg.training.averaging import WeightAverage
from medseg.training.distributed import Distributed, any_rank, unwrap
from medseg.training.optimization import Optimization, RunClock
from medseg.training.run_folder import RunFolder
from medseg.training.stopping import EarlyStopping


def test_best_epoch_follows_every_gain_but_patience_restarts_only_on_min_delta():
    stopping = EarlyStopping.from_config(TrainConfig(early_stop_patience=2, early_stop_min_delta=0.05))
    assert stopping.update({"epoch": 1, "mean_dice": 0.5, "dice_a": 0.5, "lr": 0.1}, 1)
    assert stopping.best_metrics == {"mean_dice": 0.5, "dice_a": 0.5}  # scores only, no bookkeeping
    assert stopping.update({"mean_dice": 0.51}, 2)  # a small gain: the new best ...
    assert (stopping.best_epoch, stopping.since_best, stopping.should_stop) == (2, 1, False)  # ... but no real gain
    assert not stopping.update({"mean_dice": math.nan}, 3)  # nothing scored is no gain
    assert (stopping.best_epoch, stopping.since_best, stopping.should_stop) == (2, 2, True)
    assert stopping.update({"mean_dice": 0.7}, 4) and stopping.since_best == 0 and not stopping.should_stop


def test_no_patience_never_stops_and_a_replayed_history_continues_from_the_best():
    stopping = EarlyStopping.from_config(TrainConfig())
    stopping.replay([{"epoch": 4, "mean_dice": 0.5}, {"epoch": 5, "mean_dice": 0.8}])
    for epoch in range(6, 20):
        assert not stopping.update({"mean_dice": 0.1}, epoch)
    assert not stopping.should_stop and stopping.best_epoch == 5


def test_a_resumed_run_keeps_its_count_of_validations_without_gain():
    """Patience 3, stalled for 2 validations when the run was killed: the resumed run stops after one more,
    exactly where an unbroken run stops (before, a resume restarted the count at 0)."""
    history = [
        {"epoch": 1, "step": 10, "mean_dice": 0.5},
        {"epoch": 2, "step": 20},  # not validated (val_every 2 would leave such rows)
        {"epoch": 3, "step": 30, "mean_dice": 0.49},
        {"epoch": 4, "step": 40, "mean_dice": 0.5},
    ]
    unbroken = EarlyStopping.from_config(TrainConfig(early_stop_patience=3))
    for row in history:
        if "mean_dice" in row:
            unbroken.update(row, row["epoch"])
    resumed = EarlyStopping.from_config(TrainConfig(early_stop_patience=3))
    resumed.replay(history)
    assert (
        (resumed.best_epoch, resumed.best_metric, resumed.since_best)
        == (1, 0.5, 2)
        == (
            unbroken.best_epoch,
            unbroken.best_metric,
            unbroken.since_best,
        )
    )
    assert not resumed.update({"epoch": 5, "mean_dice": 0.45}, 5) and resumed.should_stop


def test_weight_average_is_off_without_a_decay_and_restores_its_count():
    model = nn.Linear(2, 1)
    assert WeightAverage.from_config(TrainConfig(), model) is None
    average = WeightAverage.from_config(TrainConfig(ema_decay=0.5), model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model)  # the first update copies the weights
    assert torch.equal(average.module.weight, model.weight) and average.updates == 1
    other = WeightAverage(nn.Linear(2, 1), 0.5)
    other.load(average.module.state_dict(), average.updates)
    assert torch.equal(other.module.weight, model.weight) and other.updates == 1


def test_one_process_is_rank_zero_and_every_exchange_is_local():
    group = Distributed()
    model = nn.Linear(2, 1)
    assert group.is_main and not group.active
    assert group.wrap(model) is model and unwrap(model) is model
    assert group.gather({"a": 1}) == [{"a": 1}]
    assert group.decided_by_main(True) and not group.decided_by_main(False)
    assert any_rank(True) and not any_rank(False)
    group.share_buffers(model, None)
    group.barrier()


def test_optimization_steps_schedule_and_round_trips_its_state():
    model = nn.Linear(2, 1)
    train = TrainConfig(epochs=1, steps_per_epoch=4, learning_rate=0.1, grad_clip=1.0)
    clock = RunClock.from_config(train)
    optim = Optimization.from_config(model, train, clock, torch.device("cpu"), None)
    before = model.weight.detach().clone()
    optim.step((model(torch.ones(3, 2)) ** 2).sum() * 100, model)
    assert optim.steps == 1 and optim.lr == pytest.approx(0.1 * (1 - 1 / 4) ** 0.9)
    moved = (model.weight - before).abs()
    assert 0.09 < moved.min() and moved.max() < 0.101  # Adam's first step: lr per weight, at the lr before the step
    copy = Optimization.from_config(nn.Linear(2, 1), train, clock, torch.device("cpu"), None)
    copy.load_state_dicts(**optim.state_dicts())
    assert copy.steps == 1 and copy.lr == optim.lr


def test_run_folder_guards(tmp_path):
    from medseg.config import DataConfig

    with pytest.raises(MedsegError, match="no latest.pt to resume from"):
        RunFolder.resumed(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.pt").write_bytes(b"")
    with pytest.raises(MedsegError, match="already holds a training run; resume it with --resume"):
        RunFolder.new(tmp_path / "run", DataConfig(), overwrite=False)
    assert RunFolder.new(tmp_path / "run", DataConfig(), overwrite=True).path == tmp_path / "run"
