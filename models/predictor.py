"""The predictor: a loaded checkpoint that turns faces into class probabilities, in numpy.

`training.evaluate` measures through `predict_tensors` and the service answers through it, with
the same precision and the same test-time augmentation, so `/metrics` describes what is served.
The forward path (precision and runtime) is `models.precision.resolve_precision`'s choice; the
views, the softmax and the average are numpy, so nothing here needs torch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import Checkpoint, load_checkpoint
from models.config import cpu_count
from models.precision import Precision, Runtime, resolve_precision
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: every runtime's float32 logits get the same, correctly rounded, arithmetic."""
    wide = logits.astype(np.float64)
    exponentials = np.exp(wide - wide.max(axis=1, keepdims=True))
    result: np.ndarray = exponentials / exponentials.sum(axis=1, keepdims=True)
    return result


class Predictor:
    """Holds the served forward path and predicts batches of faces."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        precision: Precision = "auto",
        runtime: Runtime = "auto",
        tta: ServedTta = "checkpoint",
        threads: int | None = None,
    ) -> None:
        """`threads`: the forward pass's threads (ONNX Runtime's intra-op threads, or torch's); default: the cores.

        The engine passes its `threads`, which default to the cores too, so a predictor built
        beside a server (tests, evaluation) reuses the timings "auto" made for it.
        """
        self.checkpoint = checkpoint
        self.threads = threads or cpu_count()
        # The one place "checkpoint" is resolved: the mode the stored metrics describe.
        self.tta: TtaMode = checkpoint.figures.measured_tta if tta == "checkpoint" else check_tta(tta)
        choice = resolve_precision(checkpoint, precision, self.threads, runtime)
        self.precision: str = choice.precision
        self.runtime: str = choice.path.runtime
        self.speeds: dict[str, dict[int, float]] = choice.speeds  # faces/s of each path "auto" timed
        self._path = choice.path
        self._lock = threading.Lock()

    @property
    def int8_recipe(self) -> str:
        """How the int8 file was made ("" when int8 does not serve)."""
        return self._path.recipe if self.precision == "int8" else ""

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        *,
        precision: Precision = "auto",
        runtime: Runtime = "auto",
        tta: ServedTta = "checkpoint",
        threads: int | None = None,
    ) -> Predictor:
        """Read a checkpoint (weights only) and build its predictor; raises `CheckpointError`."""
        return cls(load_checkpoint(path), precision=precision, runtime=runtime, tta=tta, threads=threads)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in logit order."""
        return self.checkpoint.classes

    def resolve_tta(self, tta: TtaMode | None) -> TtaMode:
        """The TTA mode a call asking for `tta` gets: this predictor's own for None."""
        return self.tta if tta is None else check_tta(tta)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 32)) -> None:
        """Run a few forward passes so the runtime builds its kernels before the first request."""
        size = self.checkpoint.preprocessing.size
        for batch_size in batch_sizes:
            self.predict_tensors(np.zeros((batch_size, 1, size, size), np.float32))

    def predict_tensors(self, inputs: Any, tta: TtaMode | None = None) -> np.ndarray:
        """Normalised faces (N, 1, 48, 48) float32 → probabilities (N, classes) float64.

        `inputs` is a numpy array or anything `np.asarray` reads (a CPU torch tensor). `tta`
        overrides this predictor's test-time augmentation for this call (None: `self.tta`).
        """
        mode = self.resolve_tta(tta)
        if hasattr(inputs, "detach"):  # a torch tensor (training's evaluation): its numpy view, on the CPU
            inputs = inputs.detach().cpu().numpy()
        faces = np.asarray(inputs, dtype=np.float32)
        count = faces.shape[0]
        views = tta_views(faces, mode, self.checkpoint.preprocessing.tencrop_resize)
        with self._lock:
            logits = np.concatenate(
                [
                    self._path.forward(views[start : start + FORWARD_CHUNK])
                    for start in range(0, len(views), FORWARD_CHUNK)
                ]
            )
        probabilities = softmax(logits).reshape(-1, count, logits.shape[1]).mean(axis=0)
        normalised: np.ndarray = probabilities / probabilities.sum(axis=1, keepdims=True)
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
