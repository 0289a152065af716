"""The predictor: a loaded checkpoint that turns faces into class probabilities.

`training.evaluate` measures through `predict_tensors` and the service answers through it, with
the same precision and the same test-time augmentation, so `/metrics` describes what is served.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from models.checkpoint import Checkpoint, load_checkpoint
from models.network import fuse_for_inference
from models.preprocessing import preprocess
from models.runtime import autocast, resolve_bf16

logger = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "tencrop")
# Forward passes per face in each mode: what a face costs, relative to no TTA.
TTA_VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
# Ten-crop: the face enlarged to 52×52, its four corner crops and centre crop at 48×48, and the
# mirror image of each, averaged. Enlarging rather than cropping smaller keeps the network's
# 48×48 input; 52 was among the best geometries measured (docs/tta.md). Ten forward passes.
TENCROP_RESIZE = 52
# The forward pass runs fastest per image near batch 32 and slows beyond it as the activations
# outgrow the caches (benchmarks/results/infer.json: fp32 456 images/s at 32, 307 at 128), so the
# views of a large batch (ten-crop makes 320 of 32 faces) go through in chunks of this size.
FORWARD_CHUNK = 32


def check_tta(mode: str) -> str:
    """`mode` if it is a TTA mode the predictor offers; raises ValueError otherwise."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")
    return mode


def tta_views(inputs: torch.Tensor, mode: str) -> torch.Tensor:
    """The views a TTA mode averages over, stacked view-major: (views × N, 1, H, W)."""
    if mode == "none":
        return inputs
    if mode == "flip":
        return torch.cat([inputs, inputs.flip(-1)])
    size = inputs.shape[-1]
    enlarged = F.interpolate(inputs, size=(TENCROP_RESIZE, TENCROP_RESIZE), mode="bilinear", align_corners=False)
    edge, centre = TENCROP_RESIZE - size, (TENCROP_RESIZE - size) // 2
    crops = [
        enlarged[..., top : top + size, left : left + size]
        for top, left in ((0, 0), (0, edge), (edge, 0), (edge, edge), (centre, centre))
    ]
    return torch.cat([*crops, *(crop.flip(-1) for crop in crops)])


@dataclass(frozen=True)
class Prediction:
    """One face's answer: the probabilities in checkpoint class order, and their argmax."""

    label: str
    confidence: float
    probabilities: dict[str, float]


class Predictor:
    """Holds the network in eval mode, on the CPU, and predicts batches of faces."""

    def __init__(self, checkpoint: Checkpoint, *, precision: str = "auto", tta: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.device = torch.device("cpu")
        self.use_bf16 = resolve_bf16(precision, self.device)
        # The checkpoint says which TTA its stored metrics were measured with; serve the same.
        self.tta = check_tta(tta if tta is not None else str(checkpoint.metrics.get("tta", "none")))
        # channels_last: bf16 convolutions in oneDNN run about 2× faster in NHWC (benchmarks/infer.py).
        # BatchNorm folded into the layer before it, Dropout dropped: the same function, less work.
        network = fuse_for_inference(checkpoint.network).to(self.device)
        self.network = network.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: Path, *, precision: str = "auto", tta: str | None = None) -> Predictor:
        """Load a checkpoint (weights only) and build its predictor; raises `CheckpointError`."""
        return cls(load_checkpoint(path), precision=precision, tta=tta)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in logit order."""
        return self.checkpoint.classes

    def measured_tta_modes(self) -> tuple[str, ...]:
        """The TTA modes whose figures the checkpoint stores, the one it was measured with first."""
        metrics = self.checkpoint.metrics
        if "accuracy" not in metrics:
            return ()
        main = str(metrics.get("tta", "none"))
        alternatives = [mode for mode in metrics.get("tta_alternatives", {}) if mode in TTA_MODES and mode != main]
        return (main, *alternatives)

    def resolve_tta(self, tta: str | None) -> str:
        """The TTA mode a call asking for `tta` gets: this predictor's own for None; raises ValueError if unknown."""
        return self.tta if tta is None else check_tta(tta)

    def served_metrics(self, tta: str | None = None) -> dict[str, Any]:
        """The stored evaluation figures that describe what this predictor serves (or `tta` would).

        The checkpoint's metrics are measured with one TTA mode; `training.evaluate --also-tta`
        stores other modes under `tta_alternatives`. Serving one of those gives its figures.
        """
        metrics = dict(self.checkpoint.metrics)
        # evaluate never stores the main mode among the alternatives, so this is a no-op for it
        metrics.update(metrics.get("tta_alternatives", {}).get(self.resolve_tta(tta), {}))
        return metrics

    @property
    def precision(self) -> str:
        """ "bf16" or "fp32": what the forward pass actually runs in."""
        return "bf16" if self.use_bf16 else "fp32"

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 32)) -> None:
        """Run a few forward passes so oneDNN builds its kernels before the first request."""
        size = self.checkpoint.preprocessing.size
        for batch_size in batch_sizes:
            self.predict_tensors(torch.zeros(batch_size, 1, size, size))

    def predict_tensors(self, inputs: torch.Tensor, tta: str | None = None) -> np.ndarray:
        """Normalised faces (N, 1, 48, 48) float32 → probabilities (N, classes) float64.

        `tta` overrides this predictor's test-time augmentation for this call (None: `self.tta`).
        """
        mode = self.resolve_tta(tta)
        inputs = inputs.to(self.device)
        count = inputs.shape[0]
        with self._lock, torch.inference_mode(), autocast(self.device, self.use_bf16):
            views = tta_views(inputs, mode).contiguous(memory_format=torch.channels_last)
            logits = torch.cat([self.network(chunk) for chunk in torch.split(views, FORWARD_CHUNK)]).float()
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

    def predict(self, faces: list[Image.Image]) -> list[Prediction]:
        """Decoded face images (any mode, any size) → one `Prediction` each."""
        if not faces:
            return []
        spec = self.checkpoint.preprocessing
        batch = torch.stack([preprocess(face, spec) for face in faces])
        return self.to_predictions(self.predict_tensors(batch))
