"""Request and response models of the HTTP API (the core returns dataclasses)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from models.answers import FaceAnswer, ImageAnswer, ModelInfo
from models.engine import Engine
from models.tracking import Track, TrackSummary
from models.video import Timeline

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
    score: float = Field(..., description="the detector's confidence that this is a face, 0-1", examples=[0.93])
    landmarks: list[list[float]] | None = Field(
        None,
        description="[x, y] of the right eye, left eye (the person's), nose tip, right and left mouth corners; "
        "null for a detector that gives none",
        examples=[[[250.1, 160.4], [330.8, 158.9], [291.0, 205.2], [258.3, 246.7], [324.9, 245.0]]],
    )

    @classmethod
    def from_answer(cls, face: FaceAnswer) -> FaceOut | None:
        """Where the face was found; None when the whole image was classified."""
        detected = face.detected
        if detected is None:
            return None
        landmarks = [[round(x, 1), round(y, 1)] for x, y in detected.landmarks] if detected.landmarks else None
        return cls(box=detected.box.as_list(), score=round(detected.score, 4), landmarks=landmarks)


class SearchOut(BaseModel):
    """What the face search found in a photo (absent for a face crop, which is not searched)."""

    found: int = Field(..., description="faces the detector found")
    too_small: int = Field(..., description="faces left out for being smaller than FER_MIN_FACE_PX")
    dropped: int = Field(..., description="faces left out with faces=all beyond FER_MAX_FACES")
    no_face_reason: str | None = Field(
        None,
        description="why the whole image was classified instead of a face: 'none_found' or 'too_small'; "
        "null when a face was classified",
    )

    @classmethod
    def from_answer(cls, answer: ImageAnswer) -> SearchOut | None:
        """The search's counts; None when the upload was a face crop."""
        search = answer.search
        if search is None:
            return None
        return cls(
            found=search.found, too_small=search.too_small, dropped=search.dropped, no_face_reason=search.no_face_reason
        )


class ModelOut(BaseModel):
    """Which model answered."""

    version: str = Field(..., examples=["EmotionRecognitionModelPyTorch-3f1c2a9b7d10"])
    sha256: str = Field(..., examples=["3f1c2a9b7d10..."])
    precision: str = Field(..., description="what the forward pass ran in: fp32, bf16 or int8", examples=["int8"])

    @classmethod
    def from_info(cls, info: ModelInfo) -> ModelOut:
        """The engine's model info as the API shows it."""
        return cls(version=info.version, sha256=info.sha256, precision=info.precision)


class FacePrediction(BaseModel):
    """One face's classification."""

    label: str = Field(..., examples=["happy"])
    confidence: float = Field(..., examples=[0.861])
    probabilities: dict[str, float] = Field(..., examples=[EXAMPLE_PROBABILITIES])
    face: FaceOut | None = Field(None, description="null when the whole image was classified")

    @classmethod
    def from_face(cls, face: FaceAnswer) -> FacePrediction:
        """One face's answer."""
        return cls(**face_fields(face))


def face_fields(face: FaceAnswer) -> dict[str, Any]:
    """A face's fields as the answers show them, for the models that carry them at their top level."""
    prediction = face.prediction
    return {
        "label": prediction.label,
        "confidence": prediction.confidence,
        "probabilities": prediction.probabilities,
        "face": FaceOut.from_answer(face),
    }


class PredictionOut(FacePrediction):
    """The answer of POST /predict: the largest face, plus every face with faces=all."""

    model: ModelOut
    faces: list[FacePrediction] | None = Field(None, description="every face, largest first (faces=all only)")
    tta: str = Field(..., description="the test-time augmentation this answer was computed with", examples=["none"])
    search: SearchOut | None = Field(
        None, description="what the face search found (absent for a face crop of at most 64 px, which is not searched)"
    )

    @classmethod
    def from_answer(cls, answer: ImageAnswer, model: ModelInfo, *, every_face: bool) -> PredictionOut:
        """The largest face's answer at the top, and every face under `faces` when asked for."""
        extra: dict[str, Any] = (
            {"faces": [FacePrediction.from_face(face) for face in answer.faces]} if every_face else {}
        )
        search = SearchOut.from_answer(answer)
        if search is not None:
            extra["search"] = search
        top = face_fields(answer.faces[0])
        return cls(**top, tta=answer.tta, model=ModelOut.from_info(model), **extra)


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
    search: SearchOut | None = None
    error: ItemError | None = None

    @classmethod
    def from_answer(cls, answer: ImageAnswer, filename: str | None) -> BatchItem:
        """An image's answer in its place."""
        search = SearchOut.from_answer(answer)
        return cls(**face_fields(answer.faces[0]), filename=filename, **({"search": search} if search else {}))

    @classmethod
    def from_error(cls, error: Exception, filename: str | None, status: int) -> BatchItem:
        """An image's error in its place."""
        return cls(error=ItemError(status=status, detail=str(error)), filename=filename)


class BatchOut(BaseModel):
    """The answer of POST /predict/batch, in upload order."""

    results: list[BatchItem]
    tta: str = Field(..., description="the test-time augmentation these answers were computed with", examples=["none"])
    model: ModelOut


class ErrorOut(BaseModel):
    """Every error body."""

    detail: str = Field(
        ..., examples=["the upload is empty: send a JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF image"]
    )


class TruthMetricsOut(BaseModel):
    """Classification figures against one truth of the val split (here: the FER+ crowd's majority)."""

    truth: str = Field(..., description="what the figures are measured against, and which images count")
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    num_images: int = Field(..., description="the images that have this truth")


class MetricsOut(BaseModel):
    """The evaluation metrics stored in the checkpoint, and the model they describe.

    Two truths of the same val images: the top-level figures are against FER2013's original
    labels (`truth` says so), `ferplus` against the FER+ crowd's majority label.
    """

    model: ModelOut
    classes: list[str]
    truth: str | None = Field(
        None, description="what accuracy, macro_f1, per_class and the confusion matrix are measured against"
    )
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
    ferplus: TruthMetricsOut | None = Field(
        None, description="the same images' figures against the FER+ majority of ten crowd votes (null before measured)"
    )
    precision: str | None = Field(None, description="the precision the metrics were measured in")
    served_precision: str = Field(..., description="the precision this server runs in")
    served_runtime: str = Field(..., description="where the network runs: onnxruntime or torch")
    tta: str | None = Field(None, description="the test-time augmentation the metrics were measured with")
    served_tta: str = Field(..., description="the test-time augmentation this server applies unless asked otherwise")
    measured_tta: list[str] = Field(
        default_factory=list,
        description="the test-time augmentations whose figures the checkpoint stores: each can be asked for with "
        "?tta= on /predict, /predict/batch and /metrics",
    )
    measured_precisions: list[str] = Field(
        default_factory=list,
        description="the precisions whose figures the checkpoint stores; FER_PRECISION=auto serves the fastest "
        "here of those within 0.3 points of fp32's accuracy",
    )
    precision_speeds: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="faces/s by batch size of each path (precision/runtime) FER_PRECISION=auto timed at start-up "
        "on this machine",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="other stored figures")

    @classmethod
    def from_engine(cls, engine: Engine, figures: dict[str, Any]) -> MetricsOut:
        """Stored figures, the ones this model names as fields and the rest under `extra`."""
        own = {
            "model", "classes", "served_precision", "served_runtime", "served_tta", "measured_tta", "measured_precisions",
            "precision_speeds", "extra",
        }  # fmt: skip
        known = set(cls.model_fields) - own
        return cls(
            **{key: value for key, value in figures.items() if key in known},
            extra={key: value for key, value in figures.items() if key not in known},
            model=ModelOut.from_info(engine.model),
            classes=list(engine.model.classes),
            served_precision=engine.model.precision,
            served_runtime=engine.model.runtime,
            served_tta=engine.model.tta,
            measured_tta=list(engine.model.measured_tta),
            measured_precisions=list(engine.model.measured_precisions),
            precision_speeds={
                name: {str(batch): round(rate, 1) for batch, rate in rates.items()}
                for name, rates in engine.model.precision_speeds.items()
            },
        )


class SmoothedOut(BaseModel):
    """A track's probabilities averaged over time (exponentially, `smooth_s` seconds)."""

    label: str
    probabilities: dict[str, float]


class FrameOut(BaseModel):
    """One face of one track in one analysed frame."""

    t: float = Field(..., description="seconds from the start of the video", examples=[1.2])
    frame: int = Field(..., description="the frame's index in the file", examples=[36])
    box: list[int] = Field(
        ..., description="[x, y, width, height] in the video's pixels", examples=[[212, 80, 96, 118]]
    )
    label: str = Field(..., examples=["happy"])
    probabilities: dict[str, float] = Field(..., examples=[EXAMPLE_PROBABILITIES])
    smoothed: SmoothedOut


class SummaryOut(BaseModel):
    """A track at a glance."""

    duration_s: float = Field(..., description="seconds in view: first to last analysed frame, plus one interval")
    frames: int
    dominant: str = Field(..., description="the emotion with the highest mean probability", examples=["happy"])
    mean_probabilities: dict[str, float]


class TrackOut(BaseModel):
    """One face followed through the video."""

    id: int
    first_s: float
    last_s: float
    summary: SummaryOut
    frames: list[FrameOut]


class VideoOut(BaseModel):
    """The answer of POST /predict/video: every face tracked through the clip."""

    fps: float = Field(..., description="frames analysed per second of video", examples=[5.0])
    duration_s: float
    frames_analysed: int
    smooth_s: float = Field(..., description="the time constant of the smoothing, in seconds")
    tta: str
    model: ModelOut
    tracks: list[TrackOut] = Field(..., description="empty when no face was found")

    @classmethod
    def from_timeline(cls, timeline: Timeline, model: ModelInfo, smooth_s: float) -> VideoOut:
        """The engine's timeline as the API shows it."""
        return cls(
            fps=timeline.fps,
            duration_s=round(timeline.duration_s, 3),
            frames_analysed=timeline.frames_analysed,
            smooth_s=smooth_s,
            tta=timeline.tta,
            model=ModelOut.from_info(model),
            tracks=[
                track_out(track, summary, timeline.classes)
                for track, summary in zip(timeline.tracks, timeline.summaries, strict=True)
            ],
        )


def track_out(track: Track, summary: TrackSummary, classes: tuple[str, ...]) -> TrackOut:
    """One track, each of its frames with raw and smoothed labels."""
    frames = [
        FrameOut(
            t=round(point.t, 3),
            frame=point.frame,
            box=point.box.as_list(),
            label=classes[int(point.probabilities.argmax())],
            probabilities=dict(zip(classes, point.probabilities.tolist(), strict=True)),
            smoothed=SmoothedOut(
                label=classes[int(point.smoothed.argmax())],
                probabilities=dict(zip(classes, point.smoothed.tolist(), strict=True)),
            ),
        )
        for point in track.points
    ]
    return TrackOut(
        id=track.id,
        first_s=round(track.first_s, 3),
        last_s=round(track.last_s, 3),
        summary=SummaryOut(
            duration_s=round(summary.duration_s, 3),
            frames=summary.frames,
            dominant=summary.dominant,
            mean_probabilities=summary.mean_probabilities,
        ),
        frames=frames,
    )


class StatusOut(BaseModel):
    """/health and /ready."""

    status: str = Field(..., examples=["ok"])
