"""The predictor: a loaded checkpoint that turns faces into class probabilities.

`training.evaluate` measures through `predict_tensors` and the service answers through it, with
the same precision and the same test-time augmentation, so `/metrics` describes what is served.
The precision is `models.precision.resolve_precision`'s choice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Checkpoint, load_checkpoint
from models.precision import Precision, autocast, inference_network, resolve_precision, torch_forward
from models.tta import ServedTta, TtaMode, check_tta, tta_views

logger = logging.getLogger(__name__)

# The forward pass runs fastest per image near batch 32 and slows beyond it as the activations
# outgrow the caches (benchmarks/results/infer.json: fp32 456 images/s at 32, 307 at 128), so the
# views of a large batch (ten-crop makes 320 of 32 faces) go through in chunks of this size.
FORWARD_CHUNK = 32


@dataclass(frozen=True)
class Prediction:
    """One face's answer: the probabilities in checkpoint class order, and their argmax."""

    label: str
    confidence: float
    probabilities: dict[str, float]


class Predictor:
    """Holds the network in eval mode, on the CPU, and predicts batches of faces."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        precision: Precision = "auto",
        tta: ServedTta = "checkpoint",
        threads: int | None = None,
    ) -> None:
        """`threads`: the int8 runtime's threads (default: torch's count now, which the engine sets).

        Serving int8 sets torch to one thread for the whole process (see below).
        """
        self.checkpoint = checkpoint
        self.device = torch.device("cpu")
        self.threads = threads or torch.get_num_threads()
        # The one place "checkpoint" is resolved: the mode the stored metrics describe.
        self.tta: TtaMode = checkpoint.figures.measured_tta if tta == "checkpoint" else check_tta(tta)
        self.network = inference_network(checkpoint)
        choice = resolve_precision(checkpoint, precision, self.threads, self.network)
        self.precision: str = choice.precision
        self.speeds: dict[str, dict[int, float]] = choice.speeds  # faces/s of each path "auto" timed
        self._int8 = choice.int8
        self._forward: Callable[[torch.Tensor], torch.Tensor]
        if self.precision == "int8":
            assert choice.int8 is not None
            self._forward = choice.int8
            # ONNX Runtime runs the network on its own `threads`; torch is left the small ops around
            # it (views, softmax, preprocessing), and its OpenMP team, spinning after each of them,
            # took the cores from ORT: 495 faces/s at batch 2 against 2,955 with torch on one
            # thread. Process-wide, like the engine's other thread settings.
            torch.set_num_threads(1)
        else:
            self._forward = torch_forward(self.network, self.precision)
        self._lock = threading.Lock()

    @property
    def int8_recipe(self) -> str:
        """How the int8 file was made ("" when int8 is not loaded)."""
        return self._int8.recipe if self._int8 is not None else ""

    @classmethod
    def from_checkpoint(
        cls, path: Path, *, precision: Precision = "auto", tta: ServedTta = "checkpoint", threads: int | None = None
    ) -> Predictor:
        """Load a checkpoint (weights only) and build its predictor; raises `CheckpointError`."""
        return cls(load_checkpoint(path), precision=precision, tta=tta, threads=threads)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in logit order."""
        return self.checkpoint.classes

    def resolve_tta(self, tta: TtaMode | None) -> TtaMode:
        """The TTA mode a call asking for `tta` gets: this predictor's own for None."""
        return self.tta if tta is None else check_tta(tta)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 32)) -> None:
        """Run a few forward passes so oneDNN builds its kernels before the first request."""
        size = self.checkpoint.preprocessing.size
        for batch_size in batch_sizes:
            self.predict_tensors(torch.zeros(batch_size, 1, size, size))

    def predict_tensors(self, inputs: torch.Tensor, tta: TtaMode | None = None) -> np.ndarray:
        """Normalised faces (N, 1, 48, 48) float32 → probabilities (N, classes) float64.

        `tta` overrides this predictor's test-time augmentation for this call (None: `self.tta`).
        """
        mode = self.resolve_tta(tta)
        inputs = inputs.to(self.device)
        count = inputs.shape[0]
        with self._lock, torch.inference_mode(), autocast(self.device, self.precision == "bf16"):
            views = tta_views(inputs, mode, self.checkpoint.preprocessing.tencrop_resize)
            logits = torch.cat([self._forward(chunk) for chunk in torch.split(views, FORWARD_CHUNK)]).float()
            probabilities = torch.softmax(logits, dim=1).reshape(-1, count, logits.shape[1]).mean(dim=0)
        result: np.ndarray = probabilities.double().numpy()
        normalised: np.ndarray = result / result.sum(axis=1, keepdims=True)  # exact sums after the bf16 round trip
        return normalised

    def to_predictions(self, probabilities: np.ndarray) -> list[Prediction]:
        """Rows of probabilities → `Prediction`s."""
        predictions = []
        for row in probabilities:
            best = int(row.argmax())
            predictions.append(
                Prediction(
                    label=self.classes[best],
                    confidence=float(row[best]),
                    probabilities={name: float(p) for name, p in zip(self.classes, row, strict=True)},
                )
            )
        return predictions
