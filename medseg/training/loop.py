"""The training loop: prepare cases, train on random patches, validate on whole images.

Read top to bottom like torchvision's segmentation reference: ``prepare_items`` (the data),
``Loss`` (the criterion), ``train_one_epoch``, ``evaluate``, then ``train``, which wires them
together. Each part it wires has its own module and gets only its own config section:
`RunFolder` (what the run leaves on disk), `Optimization` (optimiser, schedule, loss scaler),
`WeightAverage` (``train.ema_decay``), `EarlyStopping` (the best epoch and patience),
`Distributed` (torchrun: DistributedDataParallel, gloo on CPU, NCCL on GPU; only rank 0
writes) and `Progress`. One typed checkpoint holds model, optimizer, scheduler, scaler,
epoch, step and every RNG state, so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from medseg.config import Config
from medseg.data.augment import ElasticAugment
from medseg.data.datasets import Case, find_cases, load_case, split_cases
from medseg.data.sampling import Item, PatchBatches, PatchSampler
from medseg.data.targets import label_map, training_target
from medseg.data.transforms import Preprocessor
from medseg.device import choose_precision, in_precision
from medseg.errors import ConfigError
from medseg.evaluation.metrics import confusion_counts, mean_scores, overlap_scores
from medseg.models import build_model
from medseg.training.averaging import WeightAverage, check_resume_averaging, ema_update
from medseg.training.checkpoint import Checkpoint, TrainingState
from medseg.training.distributed import any_rank, setup_distributed
from medseg.training.optimization import Optimization, RunClock, check_resume_clock
from medseg.training.progress import Progress
from medseg.training.run_folder import RunFolder
from medseg.training.stopping import EarlyStopping

# ema_update lives in medseg.training.averaging; it stays importable from here.
__all__ = [
    "TrainResult",
    "prepare_items",
    "prepare_run_dir",
    "Loss",
    "train_one_epoch",
    "evaluate",
    "train",
    "ema_update",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None


# --- data -------------------------------------------------------------------------------


def prepare_items(cases: Sequence[Case], config: Config, with_weights: bool) -> list[Item]:
    """Load, validate and preprocess cases into model-space items (2D models slice volumes)."""
    classes = list(config.data.classes.values())
    preprocessor = Preprocessor(config.preprocess)
    items: list[Item] = []
    for case in cases:
        scan, label = load_case(case, config.data.color, classes, ids=True)
        if scan.channels != config.model.in_channels:
            raise ConfigError(
                f"model.in_channels is {config.model.in_channels} but case {case.id} ({scan.ref.path}) has "
                f"{scan.channels} channel(s); set model.in_channels or data.color"
            )
        if label is None:
            raise ConfigError(f"case {case.id} ({scan.ref.path}) has no label; training and validation need one")
        data = preprocessor(scan, label_map(label, case.instances, config.data))
        image = torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32)
        target = torch.as_tensor(np.asarray(data["label"]), dtype=torch.float32).round()
        for item_id, img, tgt in _to_model_dims(case.id, image, target, config):
            tgt = torch.as_tensor(training_target(tgt[0].numpy(), case.instances, config, with_weights))
            items.append(Item(item_id, img, tgt))
    return items


def _to_model_dims(case_id: str, image: torch.Tensor, target: torch.Tensor, config: Config):
    """Yield (id, image, target) with as many spatial axes as the model has."""
    spatial = image.ndim - 1
    dims = config.model.spatial_dims
    if spatial == dims:
        yield case_id, image, target
    elif spatial == 3 and dims == 2:
        axis = config.train.slice_dim
        for k in range(image.shape[axis]):
            yield f"{case_id}[{k}]", image.select(axis, k), target.select(axis, k)
    else:
        raise ConfigError(
            f"model.spatial_dims is {dims} but case {case_id} has {spatial} spatial axes; a 3D model needs volumes"
        )


# --- one epoch and validation --------------------------------------------------------


class Loss(nn.Module):
    """Dice + cross-entropy, plain cross-entropy, or the U-Net paper's weighted cross-entropy.

    Plain cross-entropy is the loss whose optimum is the calibrated probability, so its
    argmax minimises pixel error; the Dice term trades pixel error for overlap of small classes.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, :1]
        if self.kind == "dice_ce":
            return self.dice_ce(logits.float(), labels)
        ce = F.cross_entropy(logits.float(), labels[:, 0].long(), reduction="none")
        return (ce * target[:, 1]).mean() if self.kind == "weighted_ce" else ce.mean()


def train_one_epoch(
    model: nn.Module,
    criterion: Loss,
    optim: Optimization,
    batches: PatchBatches,
    average: WeightAverage | None,
    progress: Progress,
    clock: RunClock,
    dtype: torch.dtype | None = None,
) -> tuple[list[float], bool]:
    """Run one epoch of steps; returns the step losses and whether the time budget ran out.

    average: the moving average to update after every step (``train.ema_decay``).
    dtype: the autocast dtype of the forward pass (None: fp32), from ``choose_precision``.
    """
    model.train()
    losses: list[float] = []
    for images, targets in batches:
        with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss = criterion(logits, targets)
        optim.step(loss, model)
        if average is not None:
            average.update(model)
        losses.append(float(loss.detach()))
        progress.step(losses[-1], optim.lr)
        if any_rank(clock.out_of_time):  # every rank stops on the same step
            return losses, True
    return losses, False


@torch.no_grad()
def evaluate(
    model: nn.Module, items: Sequence[Item], config: Config, device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Whole-image sliding-window validation: Dice and IoU per class, pixel error (nan-mean over cases).

    Windows are the ones prediction uses (``infer.roi_size``, else the training patch), so
    the validation scores what `medseg predict` will do; they run under the training dtype
    and their logits are blended in fp32.
    """
    model.eval()
    names = list(config.data.classes)
    rows = []

    predictor = in_precision(model, device, dtype)
    for item in items:
        logits = sliding_window_inference(
            item.image[None].to(device),
            roi_size=config.infer.roi_size or config.train.patch_size,
            sw_batch_size=config.infer.sw_batch_size,
            predictor=predictor,
            overlap=config.infer.overlap,
            mode="gaussian",
        )
        pred = logits.argmax(1)[0].cpu()
        rows.append(overlap_scores(confusion_counts(pred, item.target[0], len(names)), names))
    return mean_scores(rows)


# --- the whole run --------------------------------------------------------------------


def train(
    config: Config,
    resume: Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    max_epochs: int | None = None,
) -> TrainResult:
    """Train the configured model; returns where the run is and its best validation scores.

    max_epochs stops after that many epochs in this call (tests and resumable chunks);
    the schedule still spans ``train.epochs``.
    """
    group, device = setup_distributed(config.train.device)
    run, state = _run_folder(config, resume, overwrite)
    torch.manual_seed(config.train.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    # The data: every rank trains on its own patches; rank 0 alone validates and writes.
    cases = find_cases(config.data)
    train_cases, val_cases = split_cases(cases, config.data.split)
    if group.is_main:
        run.write_split(config.data.split, train_cases, val_cases, cases)
    train_items = prepare_items(train_cases, config, with_weights=config.train.loss == "weighted_ce")
    val_items = prepare_items(val_cases, config, with_weights=False) if group.is_main else []
    log.info("%d training items, %d validation items", len(train_items), len(val_items))

    # The model and everything that changes it.
    model = build_model(config.model).to(device)
    channels_last = config.train.channels_last and config.model.spatial_dims == 2
    if channels_last:  # oneDNN/cuDNN convolutions run faster on NHWC (1.1-1.3x measured here)
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.train.seed + 1000 * group.rank)
    batches = _batches(train_items, config, generator, device, channels_last)
    criterion = Loss(config.train.loss)
    clock = RunClock.from_config(config.train, state.training.elapsed_seconds if state is not None else 0.0)
    dtype = choose_precision(config.train.precision, device)
    optim = Optimization.from_config(model, config.train, clock, device, dtype)
    average = WeightAverage.from_config(config.train, model)
    judged = average.module if average is not None else model  # validated, checkpointed as "weights", predicted
    stopping = EarlyStopping.from_config(config.train)
    log.info("training on %s in %s", device, "fp32" if dtype is None else str(dtype).removeprefix("torch."))

    epoch, history = 0, []
    if state is not None:
        epoch, history = _restore(state, model, average, optim, stopping)
        generator.manual_seed(config.train.seed + 1000 * group.rank)  # then the saved state
        saved = state.training.rng
        _set_rng_state(saved[group.rank] if group.rank < len(saved) else saved[0], generator, device)
    net = group.wrap(model)

    stop_epoch = config.train.epochs if max_epochs is None else min(config.train.epochs, epoch + max_epochs)
    shown = Progress.for_run(progress, group.is_main, (stop_epoch - epoch) * config.train.steps_per_epoch, config.train)
    all_losses: list[float] = []
    while epoch < stop_epoch:
        losses, out_of_time = train_one_epoch(net, criterion, optim, batches, average, shown, clock, dtype)
        epoch += 1
        all_losses.extend(losses)
        group.share_buffers(model, average.module if average is not None else None)  # BatchNorm statistics
        row: dict[str, float] = {
            "epoch": epoch,
            "step": optim.steps,
            "train_loss": float(np.mean(losses)),
            "lr": optim.lr,
            "seconds": round(clock.elapsed, 2),
        }
        if val_items and (epoch % config.train.val_every == 0 or epoch == stop_epoch or out_of_time):
            row.update(evaluate(judged, val_items, config, device, dtype))
            stopping.update(row, epoch)
        history.append(row)
        rng = group.gather(_rng_state(generator, device))
        if group.is_main:
            checkpoint = _checkpoint(config, model, average, optim, stopping, epoch, history, rng, clock)
            run.save(checkpoint, best=stopping.best_epoch == epoch or not val_items)
            run.write_curves(history, stopping.best_epoch, stopping.best_metrics)
            shown.epoch(row)
        if group.decided_by_main(out_of_time or stopping.should_stop):
            break
    shown.close()
    if group.is_main:
        run.finish()
    group.barrier()
    return TrainResult(run.path, stopping.best_epoch, stopping.best_metrics, epoch, history, all_losses, judged)


def prepare_run_dir(config: Config, resume: Path | None = None, overwrite: bool = False) -> Path:
    """The run folder a training of ``config`` writes to, after the checks that keep it from harm: a
    resumed folder holds a latest.pt; a new one lies outside the data and holds no run unless ``overwrite``.

    Public so that a command writing into the run folder before training (``medseg train --images``
    writes the plan there) refuses exactly what training would refuse, before it writes."""
    from medseg.pipeline.output import probe_output

    if resume is not None:
        path = RunFolder.resumed(resume).path
    else:
        path = RunFolder.new(config.output_dir / config.name, config.data, overwrite).path
    probe_output(path, "the run folder (output_dir/name)")  # a file in the way, a read-only disk: before epoch 1
    return path


def _run_folder(config: Config, resume: Path | None, overwrite: bool) -> tuple[RunFolder, Checkpoint | None]:
    """The folder this call writes, and the checkpoint it continues from when it resumes."""
    if resume is None:
        return RunFolder(prepare_run_dir(config, overwrite=overwrite)), None
    run = RunFolder.resumed(resume)
    state = run.resume_state()
    log.info("resuming %s from epoch %d", run.path, state.training.epoch)
    check_resume_averaging(state.training, state.config.train, config.train, run.latest)
    check_resume_clock(state.config.train, config.train, run.latest)
    return run, state


def _batches(
    items: Sequence[Item], config: Config, generator: torch.Generator, device: torch.device, channels_last: bool
) -> PatchBatches:
    """Each epoch's ``train.steps_per_epoch`` batches of patches, augmented as ``augment`` says."""
    t, a = config.train, config.augment
    augment = ElasticAugment(config.model.spatial_dims, **a.model_dump(exclude={"enabled"})) if a.enabled else None
    return PatchBatches(
        PatchSampler(items, t.patch_size, t.foreground_oversample, generator),
        augment,
        t.batch_size,
        t.steps_per_epoch,
        device,
        channels_last,
    )


def _checkpoint(
    config: Config,
    model: nn.Module,
    average: WeightAverage | None,
    optim: Optimization,
    stopping: EarlyStopping,
    epoch: int,
    history: list[dict[str, float]],
    rng: list[dict[str, Any]],
    clock: RunClock,
) -> Checkpoint:
    """Everything `_restore` needs to continue exactly: the judged weights and, beside them, the raw ones."""
    training = TrainingState(
        **optim.state_dicts(),
        epoch=epoch,
        best_metric=stopping.best_metric,
        best_epoch=stopping.best_epoch,
        best_metrics=stopping.best_metrics,
        history=history,
        rng=rng,
        elapsed_seconds=clock.elapsed,
        training_model=model.state_dict() if average is not None else None,
        ema_updates=average.updates if average is not None else None,
    )
    return Checkpoint(config, (average.module if average is not None else model).state_dict(), training)


def _restore(
    state: Checkpoint,
    model: nn.Module,
    average: WeightAverage | None,
    optim: Optimization,
    stopping: EarlyStopping,
) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint's weights, average, optimiser and best epoch; returns its epoch and history."""
    saved = state.training
    model.load_state_dict(saved.training_model if average is not None else state.weights)
    if average is not None:
        average.load(state.weights, saved.ema_updates)
    optim.load_state_dicts(saved.optimizer, saved.scheduler, saved.scaler)
    stopping.replay(saved.history)
    return saved.epoch, list(saved.history)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
