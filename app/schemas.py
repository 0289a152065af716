"""Request and response models of the HTTP API (the core returns dataclasses)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

EXAMPLE_PROBABILITIES = {
    "angry": 0.031,
    "disgust": 0.002,
    "fear": 0.044,
    "happy": 0.861,
    "neutral": 0.038,
    "sad": 0.013,
    "surprise": 0.011,
}


class FaceOut(BaseModel):
    """Where a face was found, in the uploaded image's pixels (after EXIF orientation)."""

    box: list[int] = Field(..., description="[x, y, width, height]", examples=[[212, 96, 180, 180]])


class ModelInfo(BaseModel):
    """Which model answered."""

    version: str = Field(..., examples=["EmotionRecognitionModelPyTorch-3f1c2a9b7d10"])
    sha256: str = Field(..., examples=["3f1c2a9b7d10..."])


class FacePrediction(BaseModel):
    """One face's classification."""

    label: str = Field(..., examples=["happy"])
    confidence: float = Field(..., examples=[0.861])
    probabilities: dict[str, float] = Field(..., examples=[EXAMPLE_PROBABILITIES])
    face: FaceOut | None = Field(None, description="null when the whole image was classified")


class PredictionOut(FacePrediction):
    """The answer of POST /predict: the largest face, plus every face with faces=all."""

    model: ModelInfo
    faces: list[FacePrediction] | None = Field(None, description="every face, largest first (faces=all only)")
    tta: str = Field(..., description="the test-time augmentation this answer was computed with", examples=["none"])


class ItemError(BaseModel):
    """Why one image of a batch failed."""

    status: int = Field(..., examples=[400])
    detail: str = Field(..., examples=["the image data is truncated or corrupt"])


class BatchItem(BaseModel):
    """One batch result: a prediction, or an error in its place."""

    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    face: FaceOut | None = None
    filename: str | None = None
    error: ItemError | None = None


class BatchOut(BaseModel):
    """The answer of POST /predict/batch, in upload order."""

    results: list[BatchItem]
    tta: str = Field(..., description="the test-time augmentation these answers were computed with", examples=["none"])
    model: ModelInfo


class ErrorOut(BaseModel):
    """Every error body."""

    detail: str = Field(..., examples=["the upload is empty: send a JPEG, PNG, GIF, WebP, BMP or TIFF image"])


class MetricsOut(BaseModel):
    """The evaluation metrics stored in the checkpoint, and the model they describe."""

    model: ModelInfo
    classes: list[str]
    accuracy: float | None = None
    loss: float | None = None
    macro_f1: float | None = None
    calibration_error: float | None = Field(
        None,
        description="expected calibration error of the top probability (15 equal-width bins): 0 means "
        "that answers given with 70% confidence are right 70% of the time, and so on",
    )
    per_class: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    split: str | None = None
    num_images: int | None = None
    precision: str | None = Field(None, description="the precision the metrics were measured in")
    served_precision: str = Field(..., description="the precision this server runs in")
    tta: str | None = Field(None, description="the test-time augmentation the metrics were measured with")
    served_tta: str = Field(..., description="the test-time augmentation this server applies unless asked otherwise")
    measured_tta: list[str] = Field(
        default_factory=list,
        description="the test-time augmentations whose figures the checkpoint stores: each can be asked for with "
        "?tta= on /predict, /predict/batch and /metrics",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="other stored figures")


class StatusOut(BaseModel):
    """/health and /ready."""

    status: str = Field(..., examples=["ok"])
