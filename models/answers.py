"""What the engine answers: each face's prediction with where it was, each upload's faces, the model.

Plain values with no behaviour beyond reading them; the HTTP layer and `fer` shape them for
their users (`app/schemas.py`, `cli/results.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.face_pipeline import FaceSearch
from models.faces import DetectedFace, FaceBox
from models.predictor import Prediction, Predictor
from models.tta import TtaMode


@dataclass(frozen=True)
class FaceAnswer:
    """One face's prediction, what the detector said (None: the whole image), and its batch's size."""

    prediction: Prediction
    detected: DetectedFace | None
    batch_size: int

    @property
    def box(self) -> FaceBox | None:
        """Where the face is in the upload (after EXIF orientation); None for the whole image."""
        return self.detected.box if self.detected else None


@dataclass(frozen=True)
class ImageAnswer:
    """One upload's answer: its faces, largest first (one entry with box None when none was usable)."""

    faces: tuple[FaceAnswer, ...]
    tta: TtaMode
    search: FaceSearch | None = None  # what the detector found; None when the upload was a face crop

    @property
    def batch_size(self) -> int:
        """The largest forward pass any of its faces rode in."""
        return max(face.batch_size for face in self.faces)


@dataclass(frozen=True)
class ModelInfo:
    """Which model answers and how: what `/metrics` and every answer's `model` say."""

    version: str  # the architecture and the first 12 hex digits of the file hash
    sha256: str
    precision: str  # what the forward pass runs in ("auto" resolved)
    runtime: str = ""  # where it runs: onnxruntime or torch
    classes: tuple[str, ...] = ()  # in the order of every answer's probabilities
    tta: TtaMode = "none"  # the mode of a request that names none
    measured_tta: tuple[TtaMode, ...] = ()  # modes with stored figures for this precision, the main first
    measured_precisions: tuple[str, ...] = ()  # precisions with stored figures
    precision_speeds: dict[str, dict[int, float]] = field(default_factory=dict)  # what "auto" timed
    checkpoint: Path | None = None
    detector: str = ""

    @classmethod
    def of(cls, predictor: Predictor, detector: str) -> ModelInfo:
        """What `predictor` serves, and with which stored figures; faces found by `detector`."""
        checkpoint, figures = predictor.checkpoint, predictor.checkpoint.figures
        return cls(
            version=checkpoint.version,
            sha256=checkpoint.sha256,
            precision=predictor.precision,
            runtime=predictor.runtime,
            classes=predictor.classes,
            tta=predictor.tta,
            measured_tta=figures.measured_tta_modes(figures.reported_precision(predictor.precision)),
            measured_precisions=figures.measured_precisions(),
            precision_speeds=predictor.speeds,
            checkpoint=checkpoint.path,
            detector=detector,
        )
