"""The predictor: a loaded checkpoint that turns faces into class probabilities.

`training.evaluate` measures through `predict_tensors` and the service answers through it, with
the same precision and the same test-time augmentation, so `/metrics` describes what is served.

Precision "auto" serves the fastest path on this machine (timed once per process) among fp32,
bf16 where the CPU runs it natively, and int8 where its quantised file is present and valid; a
reduced precision is a candidate only when the checkpoint's stored val accuracy for it is within
`ACCURACY_TOLERANCE` of fp32's.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Checkpoint, load_checkpoint
from models.errors import CheckpointError
from models.int8 import Int8Network, int8_model_path, weights_sha256
from models.network import fuse_for_inference
from models.runtime import (
    ACCURACY_TOLERANCE,
    PRECISIONS,
    TIMED_BATCHES,
    Precision,
    autocast,
    cpu_supports_bf16,
    fastest,
    images_per_second,
)
from models.tta import ServedTta, TtaMode, check_tta, tta_views

logger = logging.getLogger(__name__)

# The forward pass runs fastest per image near batch 32 and slows beyond it as the activations
# outgrow the caches (benchmarks/results/infer.json: fp32 456 images/s at 32, 307 at 128), so the
# views of a large batch (ten-crop makes 320 of 32 faces) go through in chunks of this size.
FORWARD_CHUNK = 32

# "auto"'s timings, once per process and set of candidates: the machine does not change under it,
# and tests and `training.evaluate` build many predictors of one checkpoint.
_SPEEDS: dict[tuple[str, tuple[str, ...], int], dict[str, dict[int, float]]] = {}


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.checkpoint = checkpoint
        self.device = torch.device("cpu")
        self.threads = threads or torch.get_num_threads()
        # The one place "checkpoint" is resolved: the mode the stored metrics describe.
        self.tta: TtaMode = checkpoint.measured_tta if tta == "checkpoint" else check_tta(tta)
        # channels_last: bf16 convolutions in oneDNN run about 2× faster in NHWC (benchmarks/infer.py).
        # BatchNorm folded into the layer before it, Dropout dropped: the same function, less work.
        network = fuse_for_inference(checkpoint.network).to(self.device)
        self.network = network.to(memory_format=torch.channels_last)
        self._int8: Int8Network | None = None
        # Faces/s of each path "auto" timed ({} when it had one candidate or was not asked).
        self.speeds: dict[str, dict[int, float]] = {}
        self.precision: str = self._choose_precision(precision)
        self._forward = self._forward_of(self.precision)
        if self.precision == "int8":
            # ONNX Runtime runs the network on its own `threads`; torch is left the small ops around
            # it (views, softmax, preprocessing), and its OpenMP team, spinning after each of them,
            # took the cores from ORT: 495 faces/s at batch 2 against 2,955 with torch on one
            # thread. Process-wide, like the engine's other thread settings.
            torch.set_num_threads(1)
        self._lock = threading.Lock()

    def _choose_precision(self, asked: Precision) -> str:
        """The path to serve: `asked` itself, or for "auto" the fastest accurate one here."""
        if asked == "int8":
            self._int8 = self._load_int8()  # a missing or mismatched file stops start-up
            return "int8"
        if asked != "auto":
            return asked
        candidates = ["fp32"]
        if cpu_supports_bf16() and self._accurate_enough("bf16"):
            candidates.append("bf16")
        if self._accurate_enough("int8"):
            try:
                self._int8 = self._load_int8()
                candidates.append("int8")
            except CheckpointError as exc:
                logger.warning("precision auto: not serving int8 (%s)", exc)
        if len(candidates) == 1:
            return candidates[0]
        key = (self.weights_sha256, tuple(candidates), self.threads)
        if key not in _SPEEDS:
            size = self.checkpoint.preprocessing.size
            _SPEEDS[key] = {
                name: {batch: images_per_second(self._forward_of(name), size, batch) for batch in TIMED_BATCHES}
                for name in candidates
            }
        self.speeds = _SPEEDS[key]
        mode = self.checkpoint.measured_tta
        accuracy = {
            name: float(figures["accuracy"])
            for name in candidates
            if (figures := self.checkpoint.metrics_for(mode, name)) is not None and "accuracy" in figures
        }
        chosen = fastest(self.speeds, accuracy)
        logger.info(
            "precision auto: %s (faces/s at batch %s: %s)",
            chosen,
            "/".join(map(str, TIMED_BATCHES)),
            ", ".join(f"{name} {'/'.join(f'{r:.0f}' for r in rates.values())}" for name, rates in self.speeds.items()),
        )
        return chosen

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The hash that ties an int8 file to these weights (computed once: it reads every tensor)."""
        return weights_sha256(self.checkpoint.network)

    @property
    def int8_recipe(self) -> str:
        """How the int8 file was made ("" when int8 is not loaded)."""
        return self._int8.recipe if self._int8 is not None else ""

    def _accurate_enough(self, precision: str) -> bool:
        """Whether the stored val figures put `precision` within `ACCURACY_TOLERANCE` of fp32.

        A checkpoint with no per-precision figures keeps the rule every earlier checkpoint was
        served by (bf16 where native) and never gets int8 unmeasured.
        """
        if len(self.checkpoint.measured_precisions()) < 2:  # evaluated in one precision, or never
            if precision == "bf16":
                return True
            logger.info(
                "precision auto: the checkpoint stores val figures of one precision only: %s is not a candidate",
                precision,
            )
            return False
        mode = self.checkpoint.measured_tta
        reduced = self.checkpoint.metrics_for(mode, precision)
        full = self.checkpoint.metrics_for(mode, "fp32")
        if reduced is None or full is None:
            logger.info("precision auto: no stored val figures compare %s with fp32: it is not a candidate", precision)
            return False
        close = float(reduced["accuracy"]) >= float(full["accuracy"]) - ACCURACY_TOLERANCE
        if not close:
            logger.warning(
                "precision auto: %s measured %.4f on val against fp32's %.4f, more than %.1f points below; not served",
                precision, reduced["accuracy"], full["accuracy"], 100 * ACCURACY_TOLERANCE,
            )  # fmt: skip
        return close

    def _load_int8(self) -> Int8Network:
        """The checkpoint's quantised network; raises `CheckpointError` when it is missing or not these weights."""
        return Int8Network(
            int8_model_path(self.checkpoint.path),
            expected_weights=self.weights_sha256,
            num_classes=len(self.checkpoint.classes),
            size=self.checkpoint.preprocessing.size,
            threads=self.threads,
        )

    def _forward_of(self, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Normalised faces → logits in `precision` (views already made, no lock taken)."""
        if precision == "int8":
            assert self._int8 is not None
            return self._int8

        def forward(faces: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device, precision == "bf16"):
                logits: torch.Tensor = self.network(faces.contiguous(memory_format=torch.channels_last))
                return logits.float()

        return forward

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
