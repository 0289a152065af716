"""The serving engine: the one façade over decoding, the face pipeline, scheduling and the predictor.

Every call takes the same three steps, named as TorchServe's handlers name theirs:

    prepare  decode within limits and find the faces (`models/decoding.py`,
             `models/face_pipeline.py`), on the prepare threads or inline (`models/scheduling.py`)
    infer    the faces through the micro-batcher's forward passes (`Scheduler.infer`)
    answer   rows of probabilities → `FaceAnswer`s (`models/answers.py`)

`classify` does them for one upload, `classify_batch` for several, `classify_video` for each
sampled frame of a video (`models/video_analysis.py` reads and tracks). The service, `fer` and
Ray's actors go through it; nothing here knows HTTP or reads the environment.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.answers import FaceAnswer, ImageAnswer, ModelInfo
from models.batching import BatchResult, MicroBatcher
from models.config import EngineConfig
from models.decoding import decode_photo
from models.detectors import build_detector
from models.errors import FerError
from models.face_pipeline import Face, FacePolicy, PreparedImage, prepare_frame, prepare_photo
from models.predictor import Predictor
from models.scheduling import Scheduler
from models.tta import TtaMode
from models.video import SampledFrame, Timeline
from models.video_analysis import FrameListener, VideoRequest, analyse_video


class Engine:
    """Loads once at start-up; `ready` turns true after the warm-up."""

    def __init__(self, predictor: Predictor, config: EngineConfig) -> None:
        self.config = config
        self.predictor = predictor
        self.detector = build_detector(config.detector, config.detector_model, threads=config.detector_threads)
        self._batcher = MicroBatcher(predictor, config.max_batch, config.max_wait_ms, config.queue_size)
        self.scheduler = Scheduler(self._batcher, config)
        self._ready = threading.Event()

    @classmethod
    def load(cls, checkpoint: Path, config: EngineConfig | None = None) -> Engine:
        """Load the checkpoint and the face detector; raises `CheckpointError` or `DetectorError` with one line."""
        config = config or EngineConfig()
        predictor = Predictor.from_checkpoint(
            checkpoint, precision=config.precision, runtime=config.runtime, tta=config.tta, threads=config.threads
        )
        return cls(predictor, config)

    # What is served.

    @functools.cached_property
    def model(self) -> ModelInfo:
        """The served checkpoint, its precision, classes and TTA, and which stored figures describe it."""
        return ModelInfo.of(self.predictor, self.detector.name)

    def resolve_tta(self, tta: TtaMode | None) -> TtaMode:
        """The mode a request asking for `tta` (None: the served one) is answered with."""
        return self.predictor.resolve_tta(tta)

    def metrics(self, tta: TtaMode | None = None) -> dict[str, Any]:
        """The stored figures that describe serving with `tta` (`StoredFigures.served`); raises `NotMeasuredError`."""
        figures = self.predictor.checkpoint.figures
        asked = None if tta is None else self.resolve_tta(tta)
        return figures.served(self.predictor.precision, self.predictor.tta, asked)

    @property
    def queue_depth(self) -> int:
        """Faces waiting for a forward pass."""
        return self._batcher.queue_depth

    @property
    def video_jobs(self) -> int:
        """Videos being analysed now (at most `max_video_jobs`; uploads are the HTTP layer's)."""
        return self.scheduler.video_jobs

    @property
    def ready(self) -> bool:
        """True once the warm-up has run."""
        return self._ready.is_set()

    def warm_up(self) -> None:
        """Build oneDNN kernels for the batch sizes the batcher forms, then declare readiness."""
        self.predictor.warm_up((1, 2, 4, 8, min(32, self.config.max_batch), self.config.max_batch))
        self._ready.set()

    # The calls: prepare → infer → answer.

    async def classify(
        self, data: bytes, *, all_faces: bool = False, require_face: bool = False, tta: TtaMode | None = None
    ) -> ImageAnswer:
        """One upload → its largest face's prediction (every face's with `all_faces`).

        Raises:
            InvalidImageError, UnsupportedImageError, ImageTooLargeError: bad image data.
            NoFaceError: `require_face` and no face was found.
            QueueFullError: over capacity; nothing of this upload stays queued.
        """
        mode = self.resolve_tta(tta)
        prepared = await self._prepare(data, all_faces=all_faces, require_face=require_face)
        return ImageAnswer(await self._infer(prepared.faces, mode, wait_for_room=False), mode, prepared.search)

    async def classify_batch(
        self, uploads: Sequence[bytes], *, require_face: bool = False, tta: TtaMode | None = None
    ) -> list[ImageAnswer | FerError]:
        """Several uploads → each one's largest face, or the error that takes its place, in order.

        The faces wait for room in the queue (taking turns with other batch uploads) up to
        `batch_patience_s`; past it the whole call raises `QueueFullError`, since capacity is not
        any one image's fault. Over `max_batch_pixels` it raises `ImageTooLargeError`.
        """
        mode = self.resolve_tta(tta)
        work = [self._work(data, False, require_face) for data in uploads]
        prepared = await self.scheduler.prepare_each(uploads, work)
        images = [item for item in prepared if isinstance(item, PreparedImage)]
        answers = iter(await self._infer([image.faces[0] for image in images], mode, wait_for_room=True))
        return [
            ImageAnswer((next(answers),), mode, item.search) if isinstance(item, PreparedImage) else item
            for item in prepared
        ]

    async def classify_video(
        self,
        path: Path,
        *,
        fps: float | None = None,
        tta: TtaMode | None = None,
        smooth_s: float | None = None,
        on_frame: FrameListener | None = None,
    ) -> Timeline:
        """A video file → every face tracked through it, with raw and smoothed probabilities per analysed frame.

        `fps` frames per second of video are analysed (default and most: `video_fps`); each
        frame's faces take the photo's steps and the same batching queue, waiting for room.
        `on_frame(frame, faces)` is called as each frame's answer is in. Cancelling the call (a
        client that left) stops the reading and takes its queued faces out.
        """
        config, mode = self.config, self.resolve_tta(tta)
        rate = min(fps or config.video_fps, config.video_fps)
        request = VideoRequest(rate, config.video_smooth_s if smooth_s is None else smooth_s, mode)
        policy = FacePolicy.of(config, all_faces=True)
        spec = self.predictor.checkpoint.preprocessing

        async def classify_frame(frame: SampledFrame) -> tuple[FaceAnswer, ...]:
            faces = await self.scheduler.run_video(
                prepare_frame, frame.rgb, frame.scale, frame.size, self.detector, policy, spec
            )
            return await self._infer(faces, mode, wait_for_room=True)

        classes = self.predictor.classes
        return await analyse_video(path, request, config, self.scheduler, classify_frame, classes, on_frame)

    def video_job(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One of the `max_video_jobs` slots, held for a video's analysis; raises `QueueFullError`."""
        return self.scheduler.video_job()

    def close(self) -> None:
        """Stop the prepare and batching threads; photos not yet started are dropped, not decoded."""
        self.scheduler.close()
        self._batcher.close()

    # The steps.

    def prepare(
        self, data: bytes, *, all_faces: bool, require_face: bool, stop: threading.Event | None = None
    ) -> PreparedImage:
        """Decode within the limits (`stop`: its request left) and find the face(s), or the whole image when none is usable."""
        config, spec = self.config, self.predictor.checkpoint.preprocessing
        photo = decode_photo(data, config.max_pixels, config.decode_max_side, config.decode_timeout_s, stop)
        return prepare_photo(
            photo, self.detector, FacePolicy.of(config, all_faces=all_faces), spec, require_face=require_face
        )

    async def _prepare(self, data: bytes, *, all_faces: bool, require_face: bool) -> PreparedImage:
        """`prepare`, inline for a small face crop, else on a prepare thread once its pixels are admitted."""
        return await self.scheduler.prepare(data, self._work(data, all_faces, require_face))

    def _work(self, data: bytes, all_faces: bool, require_face: bool) -> Callable[[threading.Event], PreparedImage]:
        return lambda stop: self.prepare(data, all_faces=all_faces, require_face=require_face, stop=stop)

    async def _infer(self, faces: Sequence[Face], mode: TtaMode, *, wait_for_room: bool) -> tuple[FaceAnswer, ...]:
        """The faces' forward passes, then their answers."""
        if not faces:
            return ()
        results = await self.scheduler.infer([face.inputs for face in faces], mode, wait_for_room=wait_for_room)
        return tuple(self._answer(face, result) for face, result in zip(faces, results, strict=True))

    def _answer(self, face: Face, result: BatchResult) -> FaceAnswer:
        prediction = self.predictor.to_predictions(result.probabilities[None, :])[0]
        return FaceAnswer(prediction=prediction, detected=face.detected, batch_size=result.batch_size)
