"""The training loop: epochs over an in-memory split, resumable state, per-epoch history.

State (`state.pt` in the run folder) is written atomically after every epoch and holds the
model, optimiser, scheduler, early-stopping counters, RNG states and history, as plain types
and tensors so that it too loads with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.checkpoint import atomic_torch_save
from models.network import EmotionRecognitionModelPyTorch
from models.preprocessing import PreprocessingSpec, normalise
from models.runtime import autocast, resolve_bf16
from training.augment import augment_batch
from training.config import TrainConfig
from training.data import Split

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


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


def evaluate_split(
    model: nn.Module,
    split: Split,
    spec: PreprocessingSpec,
    device: torch.device,
    use_bf16: bool,
    batch_size: int = 512,
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and the predictions (N,) of `model` on a split, in eval mode."""
    model.eval()
    total_loss = 0.0
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            pixels = torch.from_numpy(split.pixels[start : start + batch_size]).to(device)
            labels = torch.from_numpy(split.labels[start : start + batch_size]).to(device)
            inputs = normalise(pixels, spec).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            with autocast(device, use_bf16):
                logits = model(inputs).float()
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            predictions.append(logits.argmax(1).cpu())
    return total_loss / len(split), torch.cat(predictions).numpy()


def train(
    config: TrainConfig,
    train_split: Split,
    val_split: Split,
    run_dir: Path,
    *,
    resume: bool = False,
    spec: PreprocessingSpec | None = None,
) -> TrainResult:
    """Train the seed architecture; writes `state.pt` and `history.json` in `run_dir` every epoch.

    Under torchrun with several processes it trains with DistributedDataParallel: every rank
    draws the same permutation and takes its own shard of it, and rank 0 alone writes files.
    """
    spec = spec or PreprocessingSpec()
    device = select_device()
    rank, world = init_distributed(device)
    is_writer = rank == 0
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    use_bf16 = resolve_bf16(config.precision, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)  # the permutation: the same on every rank
    # Augmentation differs per rank; with one process it is the same generator, as before DDP existed.
    augment_generator = (
        generator if world == 1 else torch.Generator(device=device).manual_seed(config.seed + 1000 * rank)
    )

    model = EmotionRecognitionModelPyTorch(num_classes=len(train_split.classes)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    steps_per_epoch = len(train_split) // (config.batch_size * world)
    total_steps = steps_per_epoch * config.epochs

    history: list[dict[str, float]] = []
    start_epoch = 1
    best: dict[str, Any] = {"val_loss": math.inf, "val_accuracy": -1.0, "epoch": 0, "state_dict": None}
    epochs_since_improvement = 0
    schedule = [{"from_epoch": 1, "epochs": config.epochs}]
    state_path = run_dir / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path}: no state to resume; start the run without --resume")
        state = torch.load(state_path, map_location=device, weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k != "epochs"}
        if saved != {k: v for k, v in config.to_dict().items() if k != "epochs"}:
            raise ValueError(f"{state_path}: the run was started with other settings; resume with the same flags")
        if state["config"]["epochs"] != config.epochs:
            # Allowed so that a CPU run can be extended; the cosine schedule stretches from here on.
            logger.warning("resuming with --epochs %d instead of %d", config.epochs, state["config"]["epochs"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
        # Generator states are CPU byte tensors on every device (a CUDA generator refuses a CUDA
        # tensor), and map_location has just moved them to the training device.
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:  # dropout draws from the device's global generator
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        history = list(state["history"])
        best = dict(state["best"])
        epochs_since_improvement = int(state["epochs_since_improvement"])
        start_epoch = int(state["epoch"]) + 1
        schedule = list(state.get("schedule", [{"from_epoch": 1, "epochs": int(state["config"]["epochs"])}]))
        if schedule[-1]["epochs"] != config.epochs:
            schedule.append({"from_epoch": start_epoch, "epochs": config.epochs})
        logger.info("resumed %s at epoch %d", run_dir, start_epoch)

    train_pixels = torch.from_numpy(train_split.pixels).to(device)  # (N, 48, 48) uint8
    train_labels = torch.from_numpy(train_split.labels).to(device)
    net: nn.Module = DistributedDataParallel(model) if world > 1 else model
    if world > 1:
        logger.info("rank %d of %d (DistributedDataParallel, %s)", rank, world, dist.get_backend())
    stopped_early = False
    for epoch in range(start_epoch, config.epochs + 1):
        if config.early_stop_patience and epochs_since_improvement >= config.early_stop_patience:
            stopped_early = True
            break
        net.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_split), generator=generator, device=device)[rank::world]
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=None, leave=False)
        for step_in_epoch in bar:
            if config.schedule == "cosine":
                lr = cosine_lr(config, (epoch - 1) * steps_per_epoch + step_in_epoch, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            index = order[step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size]
            inputs = normalise(train_pixels[index], spec).unsqueeze(1)  # (B, 1, 48, 48) float32
            inputs = augment_batch(inputs, config, augment_generator).contiguous(memory_format=torch.channels_last)
            labels = train_labels[index]
            with autocast(device, use_bf16):
                logits = net(inputs)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch stubs leave backward untyped
            optimizer.step()
            seen += labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += float(loss.detach()) * labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        train_seconds = time.perf_counter() - started
        val_loss, val_predictions = evaluate_split(model, val_split, spec, device, use_bf16)
        val_accuracy = float((val_predictions == val_split.labels).mean())
        if config.schedule == "plateau":
            plateau.step(val_loss)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "train_images_per_second": seen / train_seconds,
        }
        history.append(record)
        if val_loss < best["val_loss"]:
            epochs_since_improvement = 0
        else:
            epochs_since_improvement += 1
        improved = (
            (config.selection == "val_loss" and val_loss < best["val_loss"])
            or (config.selection == "val_accuracy" and val_accuracy > best["val_accuracy"])
            or config.selection == "final"
        )
        if val_loss < best["val_loss"]:
            best["val_loss"] = val_loss
        if val_accuracy > best["val_accuracy"]:
            best["val_accuracy"] = val_accuracy
        if improved:
            best["epoch"] = epoch
            best["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        logger.info(
            "epoch %d/%d train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e | %.1fs, %.0f img/s",
            epoch, config.epochs, record["train_loss"], record["train_accuracy"], val_loss, val_accuracy,
            record["lr"], record["seconds"], record["train_images_per_second"],
        )  # fmt: skip
        if not is_writer:
            continue
        atomic_torch_save(
            {
                "config": config.to_dict(),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                "history": history,
                "best": best,
                "epochs_since_improvement": epochs_since_improvement,
                "schedule": schedule,
            },
            state_path,
        )
        (run_dir / HISTORY_FILE).write_text(json.dumps({"config": config.to_dict(), "history": history}, indent=1))
    if best["state_dict"] is None:
        raise RuntimeError("no epoch was trained: raise --epochs or start a new run")
    return TrainResult(
        state_dict=best["state_dict"],
        chosen_epoch=int(best["epoch"]),
        history=history,
        stopped_early=stopped_early,
        schedule=schedule,
    )
