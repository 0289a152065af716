"""What `--resume` needs and which epoch a run hands back: `RunState` and `select_epoch`.

State (`state.pt` in the run folder) is written atomically after every epoch and holds the
model, optimiser, scheduler, early-stopping counters, RNG states and history, as plain types
and tensors so that it too loads with `weights_only=True`. Older files still resume: one
without `schedule` gets its one-segment schedule, and a config without a field added since
(such as `architecture`) counts as that field's default. A state also holds a digest of the
training images and targets, so that a resume on others (the same flags, a rewritten file) is
refused; one written before the digest existed resumes unchecked.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import atomic_torch_save
from training.config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Selection:
    """The epoch whose weights the run hands back, the best val figures so far, and the early-stop count."""

    val_loss: float = math.inf  # lowest so far
    val_accuracy: float = -1.0  # highest so far
    epoch: int = 0  # the chosen epoch; 0 before one is chosen
    state_dict: dict[str, torch.Tensor] | None = None  # the chosen epoch's weights, on the CPU
    epochs_since_improvement: int = 0  # epochs since val loss last fell

    def has_stalled(self, patience: int) -> bool:
        """True when val loss has not fallen for `patience` epochs (0: never)."""
        return bool(patience) and self.epochs_since_improvement >= patience


def select_epoch(
    selection: Selection, rule: str, epoch: int, val_loss: float, val_accuracy: float, model: nn.Module
) -> Selection:
    """The selection after `epoch`: its weights are taken when `rule` ("final", "val_loss", "val_accuracy") says so."""
    lower_loss = val_loss < selection.val_loss
    higher_accuracy = val_accuracy > selection.val_accuracy
    is_chosen = rule == "final" or (rule == "val_loss" and lower_loss) or (rule == "val_accuracy" and higher_accuracy)
    return Selection(
        val_loss=val_loss if lower_loss else selection.val_loss,
        val_accuracy=val_accuracy if higher_accuracy else selection.val_accuracy,
        epoch=epoch if is_chosen else selection.epoch,
        state_dict=(
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if is_chosen else selection.state_dict
        ),
        epochs_since_improvement=0 if lower_loss else selection.epochs_since_improvement + 1,
    )


def training_data_digest(pixels: np.ndarray, targets: np.ndarray) -> str:
    """SHA-256 of a run's training images (N, H, W) uint8 and targets (N, classes) float32, in order."""
    digest = hashlib.sha256()
    for array in (pixels, targets):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config as the current code reads it, less what a resume may change.

    `epochs` stretches the schedule; `interpolation` only decides what the finished run's
    checkpoint holds, so a finished run can be written again with another one.

    Fields added since the run started take their defaults: a state.pt written before
    `architecture` existed trained the default network.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {k: v for k, v in {**defaults, **config}.items() if k not in ("epochs", "interpolation")}


@dataclass
class RunState:
    """Everything `--resume` needs, live during a run: the training objects and the record so far.

    `save` writes it to `state.pt` (same keys as ever, so older runs resume) and `load` restores it.
    """

    config: TrainConfig
    model: nn.Module  # unwrapped, on the training device
    optimizer: torch.optim.Optimizer
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau
    generator: torch.Generator  # draws each epoch's permutation
    device: torch.device
    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    schedule: list[dict[str, int]] = field(default_factory=list)
    # `training_data_digest` of the images and targets the run trains on: a resume on other ones
    # (a rewritten teacher, votes or data file) would mix two runs in one. "" = not known.
    data_digest: str = ""

    def __post_init__(self) -> None:
        if not self.schedule:
            self.schedule = [{"from_epoch": 1, "epochs": self.config.epochs}]

    def save(self, path: Path) -> None:
        """Write the state atomically, as plain types and tensors."""
        best = {
            "val_loss": self.selection.val_loss,
            "val_accuracy": self.selection.val_accuracy,
            "epoch": self.selection.epoch,
            "state_dict": self.selection.state_dict,
        }
        cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        atomic_torch_save(
            {
                "config": self.config.to_dict(),
                "epoch": self.epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "plateau": self.plateau.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                **cuda_rng,
                "history": self.history,
                "best": best,
                "epochs_since_improvement": self.selection.epochs_since_improvement,
                "schedule": self.schedule,
                "data_digest": self.data_digest,
            },
            path,
        )

    def load(self, path: Path) -> None:
        """Restore the state saved at `path` into this run (`weights_only=True`).

        Raises:
            FileNotFoundError: there is no state to resume.
            ValueError: the run was started with other settings (only `epochs` may change), or on
                other training images or targets.
        """
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no state to resume; start the run without --resume")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if _comparable(state["config"]) != _comparable(self.config.to_dict()):
            raise ValueError(f"{path}: the run was started with other settings; resume with the same flags")
        saved_digest = str(state.get("data_digest", ""))  # states written before the digest existed have none
        if saved_digest and self.data_digest and saved_digest != self.data_digest:
            raise ValueError(
                f"{path}: the run was started on other training images or targets (a data, votes or teacher "
                "file changed since); restore that file or start a new run"
            )
        saved_epochs = int(state["config"]["epochs"])
        if saved_epochs != self.config.epochs:
            # Allowed so that a CPU run can be extended; the cosine schedule stretches from here on.
            logger.warning("resuming with --epochs %d instead of %d", self.config.epochs, saved_epochs)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.plateau.load_state_dict(state["plateau"])
        # Generator states are CPU byte tensors on every device (a CUDA generator refuses a CUDA
        # tensor), and map_location has just moved them to the training device.
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and "cuda_rng" in state:  # dropout draws from the device's global generator
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        best = state["best"]
        chosen = best["state_dict"]
        self.selection = Selection(
            val_loss=float(best["val_loss"]),
            val_accuracy=float(best["val_accuracy"]),
            epoch=int(best["epoch"]),
            state_dict=None if chosen is None else {k: v.cpu() for k, v in chosen.items()},
            epochs_since_improvement=int(state["epochs_since_improvement"]),
        )
        self.schedule = list(state.get("schedule", [{"from_epoch": 1, "epochs": saved_epochs}]))
        if self.schedule[-1]["epochs"] != self.config.epochs:
            self.schedule.append({"from_epoch": self.epoch + 1, "epochs": self.config.epochs})
