"""The training loop, along the seams of torchvision's references/classification/train.py.

`train_one_epoch` trains one epoch, `evaluate` measures the model being trained on the val split
(through `predict_split`, the batched loop `training.evaluate` measures the predictor with),
`training.state.select_epoch` decides whose weights the run hands back, and
`training.state.RunState` holds everything `--resume` needs. `train` puts them together.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.network import build_network
from models.preprocessing import PreprocessingSpec, to_model_input
from models.torch_backend import autocast, resolve_bf16
from training.augment import augment_batch
from training.config import TrainConfig
from training.data import Split
from training.metrics import mean_cross_entropy
from training.speed import speed_up_for_training
from training.state import STATE_FILE, RunState, select_epoch, training_data_digest

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"

# Model input (N, 1, H, W) float32 → class probabilities (N, classes) float64.
Forward = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run hands back: the chosen weights and the record."""

    state_dict: dict[str, torch.Tensor]
    chosen_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool
    # Each start or resume that changed --epochs: the cosine schedule was stretched from there.
    schedule: list[dict[str, int]]


def select_device() -> torch.device:
    """CUDA when present (this process's GPU under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser; no weight decay on biases and BatchNorm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def cosine_lr(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up to `config.lr`, then cosine decay to zero at `total_steps`."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def predict_split(
    forward: Forward,
    split: Split,
    spec: PreprocessingSpec,
    *,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> np.ndarray:
    """Run `forward` over a split in batches of model input; the probabilities (N, classes) float64."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            pixels = torch.from_numpy(split.pixels[start : start + batch_size])
            chunks.append(forward(to_model_input(pixels if device is None else pixels.to(device), spec)))
    return np.concatenate(chunks)


def evaluate(
    model: nn.Module,
    split: Split,
    spec: PreprocessingSpec,
    device: torch.device,
    use_bf16: bool,
    majority: np.ndarray | None = None,
) -> tuple[float, float, float | None]:
    """(mean cross-entropy, accuracy, FER+ majority accuracy or None) of the model being trained, in eval mode.

    `majority`: the split's FER+ majority labels (`training.ferplus.ferplus_majority`, -1 = none).

    This is the per-epoch val figure: the training network as it is (unfused, autocast as in
    training, no TTA). The checkpoint's stored metrics come from `training.evaluate` instead,
    through the predictor that serves it.
    """
    model.eval()

    def forward(inputs: torch.Tensor) -> np.ndarray:
        with autocast(device, use_bf16):
            logits = model(inputs.contiguous(memory_format=torch.channels_last)).float()
        # float64 softmax: the loss is its log, and float32 probabilities underflow to 0
        probabilities: np.ndarray = torch.softmax(logits.double(), dim=1).cpu().numpy()
        return probabilities

    probabilities = predict_split(forward, split, spec, device=device)
    predicted = probabilities.argmax(1)
    accuracy = float((predicted == split.labels).mean())
    ferplus_accuracy = None
    if majority is not None and (counted := majority >= 0).any():
        ferplus_accuracy = float((predicted[counted] == majority[counted]).mean())
    return mean_cross_entropy(split.labels, probabilities), accuracy, ferplus_accuracy


def seed_generators(seed: int, device: torch.device, rank: int, world: int) -> tuple[torch.Generator, torch.Generator]:
    """Seed torch's global generator (initialisation, dropout); returns (permutation, augmentation) generators.

    The permutation generator is the same on every rank, so the ranks shard one shuffle.
    Augmentation differs per rank; with one process it is the same generator, as before DDP existed.
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    augment_generator = generator if world == 1 else torch.Generator(device=device).manual_seed(seed + 1000 * rank)
    return generator, augment_generator


def log_epoch(record: dict[str, float], epochs: int) -> None:
    """One summary line per epoch: progress bars do not survive in `nohup` logs."""
    logger.info(
        "epoch %d/%d train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e | %.1fs, %.0f img/s",
        record["epoch"], epochs, record["train_loss"], record["train_accuracy"], record["val_loss"],
        record["val_accuracy"], record["lr"], record["seconds"], record["train_images_per_second"],
    )  # fmt: skip
    if "val_ferplus_accuracy" in record:
        logger.info("epoch %d val FER+ majority acc %.4f", record["epoch"], record["val_ferplus_accuracy"])


def train_one_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    *,
    config: TrainConfig,
    log_prior_shift: torch.Tensor,
    spec: PreprocessingSpec,
    generator: torch.Generator,
    epoch: int,
    steps: int,
    use_bf16: bool,
) -> tuple[float, float, int]:
    """Train one epoch of `steps` batches; returns (mean train loss, train accuracy, images seen).

    Args:
        pixels: the whole training split, (N, H, W) uint8 on the training device.
        targets: its target distributions, (N, classes) float32 on the same device (one-hot for hard labels).
        log_prior_shift: (classes,) added to the logits inside the loss (logit adjustment; zeros for none).
        order: this rank's shuffled indices into `pixels` for this epoch.
        generator: the augmentation's random generator.
        steps: batches per epoch, the same on every rank (DistributedDataParallel syncs each step).
    """
    net.train()
    total_steps = steps * config.epochs
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{config.epochs}", disable=None, leave=False)
    for step in bar:
        if config.schedule == "cosine":
            lr = cosine_lr(config, (epoch - 1) * steps + step, total_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        inputs = to_model_input(pixels[index], spec)  # (B, 1, 48, 48) float32
        inputs = augment_batch(inputs, config, generator).contiguous(memory_format=torch.channels_last)
        batch_targets = targets[index]
        batch_labels = batch_targets.argmax(1)
        with autocast(pixels.device, use_bf16):
            logits = net(inputs)
        loss = soft_cross_entropy(logits.float() + log_prior_shift, batch_targets, config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch stubs leave backward untyped
        optimizer.step()
        seen += batch_labels.numel()
        correct += int((logits.argmax(1) == batch_labels).sum())
        loss_sum += float(loss.detach()) * batch_labels.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return loss_sum / seen, correct / seen, seen


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against target distributions (N, C), smoothed towards uniform.

    With one-hot targets this is `F.cross_entropy(logits, labels, label_smoothing=...)`.
    """
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]
    return -(smoothed * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def starting_weights(config: TrainConfig, classes: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """`config.init_from`'s weights (None: train from scratch), checked against the run's network and classes.

    Raises:
        CheckpointError: the file is not a readable checkpoint.
        ValueError: another architecture, or other classes or another class order.
    """
    if not config.init_from:
        return None
    start = load_checkpoint(Path(config.init_from))
    if start.architecture != config.architecture:
        raise ValueError(f"{config.init_from}: a {start.architecture}, not a {config.architecture}")
    if start.classes != classes:
        raise ValueError(f"{config.init_from}: its classes {list(start.classes)} are not the data's {list(classes)}")
    return {name: tensor.clone() for name, tensor in start.network.state_dict().items()}


def target_prior(targets: np.ndarray) -> np.ndarray:
    """(classes,) float64: the mean training target, floored at 1e-6 so that its log is finite."""
    prior: np.ndarray = np.clip(targets.mean(axis=0, dtype=np.float64), 1e-6, None)
    return prior


def start_run(
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    generator: torch.Generator,
    initial_weights: dict[str, torch.Tensor] | None = None,
) -> RunState:
    """A fresh run's state: the network built from `config.architecture` (with `initial_weights`), its optimiser."""
    model = build_network(config.architecture, num_classes=num_classes)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    if config.cpu_speedups and device.type == "cpu":
        speed_up_for_training(model)
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    return RunState(
        config=config, model=model, optimizer=optimizer, plateau=plateau, generator=generator, device=device
    )


def train(
    config: TrainConfig,
    train_split: Split,
    val_split: Split,
    run_dir: Path,
    *,
    resume: bool = False,
    spec: PreprocessingSpec | None = None,
    targets: np.ndarray | None = None,
    val_majority: np.ndarray | None = None,
    initial_weights: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `config.architecture`; writes `state.pt` and `history.json` in `run_dir` every epoch.

    `targets`: (N, classes) float32 target distributions for `train_split` (default: its labels,
    one-hot). `val_majority`: val's FER+ majority labels, for the per-epoch FER+ figure.
    `initial_weights`: `starting_weights(config, ...)` when the caller has read them already.

    Under torchrun with several processes it trains with DistributedDataParallel: every rank
    draws the same permutation and takes its own shard of it, and rank 0 alone writes files.
    """
    spec = spec or PreprocessingSpec()
    device = select_device()
    rank, world = init_distributed(device)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    use_bf16 = resolve_bf16(config.precision, device)
    generator, augment_generator = seed_generators(config.seed, device, rank, world)
    if initial_weights is None:
        initial_weights = starting_weights(config, train_split.classes)
    if targets is None:
        targets = np.eye(len(train_split.classes), dtype=np.float32)[train_split.labels]
    state = start_run(config, len(train_split.classes), device, generator, initial_weights)
    state.data_digest = training_data_digest(train_split.pixels, targets)
    if resume:
        state.load(run_dir / STATE_FILE)
        logger.info("resumed %s at epoch %d", run_dir, state.epoch + 1)
    train_pixels = torch.from_numpy(train_split.pixels).to(device)  # (N, 48, 48) uint8
    train_targets = torch.from_numpy(targets).to(device)  # (N, classes) float32
    log_prior = torch.from_numpy(np.log(target_prior(targets))).float().to(device)
    log_prior_shift = config.logit_adjustment * log_prior
    steps = len(train_split) // (config.batch_size * world)
    net: nn.Module = DistributedDataParallel(state.model) if world > 1 else state.model
    if world > 1:
        logger.info("rank %d of %d (DistributedDataParallel, %s)", rank, world, dist.get_backend())
    stopped_early = False
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.selection.has_stalled(config.early_stop_patience):
            stopped_early = True
            break
        started = time.perf_counter()
        order = torch.randperm(len(train_split), generator=generator, device=device)[rank::world]
        train_loss, train_accuracy, seen = train_one_epoch(
            net, state.optimizer, train_pixels, train_targets, order, config=config, log_prior_shift=log_prior_shift,
            spec=spec, generator=augment_generator, epoch=epoch, steps=steps, use_bf16=use_bf16,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy, val_ferplus = evaluate(state.model, val_split, spec, device, use_bf16, val_majority)
        if config.schedule == "plateau":
            state.plateau.step(val_loss)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": state.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "train_images_per_second": seen / train_seconds,
        }
        if val_ferplus is not None:
            record["val_ferplus_accuracy"] = val_ferplus
        state.epoch = epoch
        state.history.append(record)
        state.selection = select_epoch(state.selection, config.selection, epoch, val_loss, val_accuracy, state.model)
        log_epoch(record, config.epochs)
        if rank == 0:
            state.save(run_dir / STATE_FILE)
            history = {"config": config.to_dict(), "history": state.history}
            (run_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    if state.selection.state_dict is None:
        raise RuntimeError("no epoch was trained: raise --epochs or start a new run")
    return TrainResult(
        state_dict=state.selection.state_dict,
        chosen_epoch=state.selection.epoch,
        history=state.history,
        stopped_early=stopped_early,
        schedule=state.schedule,
    )
