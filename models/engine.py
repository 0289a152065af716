"""The serving engine: predictor + face detector + micro-batcher, behind two calls.

`prepare` turns upload bytes into model inputs, one per face; it is CPU-bound, so
`prepare_in_pool` runs it on the engine's threads, and callers run it inline only when `is_quick`
says the upload is a small face crop. `submit` queues one input for the next batched forward
pass. Nothing here knows HTTP.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from models.batching import BatchResult, MicroBatcher
from models.errors import NoFaceError
from models.faces import FACE_CROP_MAX_SIDE, FaceBox, FaceDetector
from models.predictor import Prediction, Predictor
from models.preprocessing import PreprocessingSpec, decode_image, peek_size, preprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceInput:
    """One face ready for the network: (1, 48, 48) float32, and where it was found."""

    inputs: torch.Tensor
    box: FaceBox | None


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs; the service fills them from its settings."""

    precision: str = "auto"
    tta: str | None = None  # None: what the checkpoint's metrics were measured with
    threads: int = 2
    max_batch: int = 32
    max_wait_ms: float = 0.0
    queue_size: int = 256
    max_pixels: int = 40_000_000
    prepare_workers: int = 2  # threads that decode photos and detect faces


def prepare_faces(
    data: bytes,
    detector: FaceDetector,
    spec: PreprocessingSpec,
    *,
    max_pixels: int | None = None,
    all_faces: bool = False,
    require_face: bool = False,
) -> list[FaceInput]:
    """Image bytes → one model input per face; the whole image when no face is found.

    Raises:
        InvalidImageError, UnsupportedImageError, ImageTooLargeError: bad image data.
        NoFaceError: `require_face` and no face was found.
    """
    image = decode_image(data, max_pixels=max_pixels)
    faces = detector.find_faces(image, all_faces=all_faces)
    if faces:
        return [FaceInput(preprocess(face.image, spec), face.box) for face in faces]
    if require_face:
        raise NoFaceError("no face was found in the image: send a photo with a frontal face, or drop require_face")
    return [FaceInput(preprocess(image, spec), None)]


# A face crop this small decodes and preprocesses in about 0.1 ms with no face detection, less
# than handing it to a worker thread and back costs; anything larger goes to a thread.
QUICK_MAX_BYTES = 64 * 1024
QUICK_MAX_PIXELS = 128 * 128


def is_quick(data: bytes) -> bool:
    """True for a small face crop (by its header) that is cheaper to prepare inline than in a thread."""
    if len(data) > QUICK_MAX_BYTES:
        return False
    size = peek_size(data)
    return size is not None and size[0] * size[1] <= QUICK_MAX_PIXELS and min(size) <= FACE_CROP_MAX_SIDE


class Engine:
    """Loads once at start-up; `ready` turns true after the warm-up."""

    def __init__(self, predictor: Predictor, config: EngineConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.detector = FaceDetector()
        self.batcher = MicroBatcher(predictor, config.max_batch, config.max_wait_ms, config.queue_size)
        # A few threads, not one per request: decoding and detection are CPU-bound (OpenCV and
        # Pillow release the GIL), so more threads than cores only add contention and memory.
        self._prepare_pool = ThreadPoolExecutor(config.prepare_workers, thread_name_prefix="fer-prepare")
        self._ready = threading.Event()

    @classmethod
    def load(cls, checkpoint: Path, config: EngineConfig) -> Engine:
        """Load the checkpoint (weights only); raises `CheckpointError` with a one-line reason."""
        torch.set_num_threads(config.threads)
        return cls(Predictor.from_checkpoint(checkpoint, precision=config.precision, tta=config.tta), config)

    @property
    def ready(self) -> bool:
        """True once the warm-up has run."""
        return self._ready.is_set()

    def warm_up(self) -> None:
        """Build oneDNN kernels for the batch sizes the batcher forms, then declare readiness."""
        self.predictor.warm_up((1, 2, 4, 8, min(32, self.config.max_batch), self.config.max_batch))
        self._ready.set()

    def prepare(self, data: bytes, *, all_faces: bool = False, require_face: bool = False) -> list[FaceInput]:
        """Decode, find the face(s) and preprocess; see `prepare_faces`."""
        return prepare_faces(
            data,
            self.detector,
            self.predictor.checkpoint.preprocessing,
            max_pixels=self.config.max_pixels,
            all_faces=all_faces,
            require_face=require_face,
        )

    def prepare_in_pool(
        self, data: bytes, *, all_faces: bool = False, require_face: bool = False
    ) -> Future[list[FaceInput]]:
        """`prepare` on one of the engine's prepare threads; the Future carries its result or error."""
        return self._prepare_pool.submit(self.prepare, data, all_faces=all_faces, require_face=require_face)

    def submit(self, face: FaceInput, tta: str | None = None) -> Future[BatchResult]:
        """Queue one face for the next forward pass; raises `QueueFullError` when over capacity.

        `tta` asks for another test-time augmentation than the served one for this face.
        """
        return self.batcher.submit(face.inputs, tta)

    def prediction(self, result: BatchResult) -> Prediction:
        """A batch row → a `Prediction`."""
        return self.predictor.to_predictions(result.probabilities[None, :])[0]

    def close(self) -> None:
        """Finish queued work and stop the prepare and batching threads."""
        self._prepare_pool.shutdown(wait=True)
        self.batcher.close()
