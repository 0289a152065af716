"""The serving engine: the one façade over decoding, face detection, batching and the predictor.

`classify` takes one upload's bytes and options and returns its face predictions;
`classify_batch` does the same for several uploads at once. The engine decides where each step
runs (a small face crop is decoded inline, a photo on the engine's prepare threads), queues the
faces for the micro-batcher, waits for room when a batch upload needs it, cancels what nobody
will read, and turns rows of probabilities into `Prediction`s. The service, `fer predict` and
any other caller go through it; the predictor, batcher, detector and queue admission are its
internals. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.admission import QueueRoom
from models.batching import BatchResult, MicroBatcher
from models.detectors import DetectorName, build_detector
from models.errors import FerError, ImageTooLargeError, InvalidVideoError, NoFaceError, NotMeasuredError, QueueFullError
from models.faces import FACE_CROP_MAX_SIDE, DetectedFace, FaceBox, FacePolicy, FaceSearch, find_faces
from models.memory import release_memory_after
from models.predictor import Prediction, Predictor
from models.preprocessing import decode_cost, decode_photo, peek_size, preprocess, to_grayscale, to_rgb
from models.runtime import Precision
from models.tracking import MAX_GAP_S, Tracker, summarise
from models.tta import ServedTta, TtaMode
from models.video import DEFAULT_FPS, DEFAULT_MAX_SIDE, DEFAULT_SMOOTH_S, SampledFrame, Timeline, VideoReader

logger = logging.getLogger(__name__)


def cpu_count() -> int:
    """Cores this process may use (the default for the thread counts)."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine, with its default; the service's settings derive theirs from these."""

    precision: Precision = "auto"
    tta: ServedTta = "checkpoint"
    threads: int = field(default_factory=cpu_count)  # torch intra-op threads
    # OpenCV's own threads per detection: 1, since photos are already searched on `prepare_workers`
    # threads at once, and OpenCV's pool on top of them oversubscribed the cores (docs/photos.md).
    opencv_threads: int = 1
    # Decoding and face detection of photos: one thread per core keeps the cores busy without
    # dozens of threads contending (and each holding decode buffers) under load.
    prepare_workers: int = field(default_factory=cpu_count)
    # 32 images per forward pass: images/s at batch 32 is near the plateau on 2 cores (benchmarks/infer.py)
    max_batch: int = 32
    # No waiting: a lone request runs at once, and under load the requests that queue during one
    # forward pass form the next batch (benchmarks/RESULTS.md measured 0 against 2 ms).
    max_wait_ms: float = 0.0
    queue_size: int = 256  # faces waiting for a forward pass; beyond it a single image is refused
    max_pixels: int = 40_000_000
    detector: DetectorName = "yunet"
    detector_model: Path | None = None  # None: the model file shipped beside the detector's module
    # YuNet on a copy at most 320 px on its longer side: 8 ms a photo on one core, and every
    # kdef-dev face found (docs/photos.md); a larger side finds smaller faces in big photos.
    detect_max_side: int = 320
    # A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps its longer side at least
    # this: 3× the detection side, so a face YuNet finds at its smallest is still ~30 px to crop.
    decode_max_side: int = 960
    # Pixels to be decoded (from the headers, after JPEG draft scaling) of the uploads on or
    # waiting for the prepare threads; beyond this a photo gets 503 at once, so a flood of big
    # images cannot queue unbounded work: about half a second of decoding on two cores, or
    # twenty phone JPEGs (decoded at a quarter). One image up to the pixel limit is always
    # admitted alone. At 160 M and 48 M an ordinary photo waited 2.1-2.7 s behind 40 clients
    # of 5 MB PNGs (benchmarks/attacks.py), past the 2 s it should be answered or shed in.
    max_pending_pixels: int = 16_000_000
    # Pixels to decode in one /predict/batch upload, all its images together: about 3 s of
    # decoding on two cores, so no single request holds the prepare threads for long (a batch
    # of twenty 36-megapixel PNGs would take them for ~20 s).
    max_batch_pixels: int = 160_000_000
    # A decode still reading the data after this long is stopped (a crafted file can take
    # minutes); a 40-megapixel PNG decodes in about a second here.
    decode_timeout_s: float = 5.0
    max_faces: int = 20  # faces classified per image with faces=all: a crowd answers in bounded time
    min_face_px: int = 24  # faces whose box is smaller (in the upload's pixels) are not classified
    # How long the faces of one batch upload may wait for their turn and room in the queue.
    batch_patience_s: float = 10.0
    # Video (docs/video.md): frames analysed per second of video (a request may ask for fewer);
    # the longest video taken; frames scaled down to this side before face detection (a face
    # YuNet finds at its smallest is still ~50 px to crop); how many seconds the exponential
    # average of each track's probabilities remembers.
    video_fps: float = DEFAULT_FPS
    max_video_seconds: float = 120.0
    video_max_side: int = DEFAULT_MAX_SIDE
    video_smooth_s: float = DEFAULT_SMOOTH_S
    # Pixels a video may make the decoder produce, all its frames together (every frame is
    # decoded, sampled or not): 120 s of 1080p at 30 frames/s is 7.5 G, about 40 s of decoding
    # on two cores; a 4K clip at 60 frames/s reaches it in 20 s.
    max_video_pixels: int = 10_000_000_000


ENGINE_DEFAULTS = EngineConfig()


@dataclass(frozen=True)
class FaceInput:
    """One face ready for the network: (1, 48, 48) float32, and what the detector said (upload pixels)."""

    inputs: torch.Tensor
    detected: DetectedFace | None


@dataclass(frozen=True)
class PreparedImage:
    """An upload's faces ready for the network, and what the face search found."""

    faces: list[FaceInput]
    search: FaceSearch | None  # None: a face crop, not searched


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
    """Which model answers: its version, file hash, and the precision its forward pass runs in."""

    version: str
    sha256: str
    precision: str


# A face crop this small decodes and preprocesses in about 0.1 ms with no face detection, less
# than handing it to a worker thread and back costs; anything larger goes to a thread.
QUICK_MAX_BYTES = 64 * 1024
QUICK_MAX_PIXELS = 128 * 128


async def gather_or_cancel(futures: Sequence[Future[Any] | asyncio.Future[Any]]) -> list[Any]:
    """Every future's result, in order; if any fails or the caller goes away, the rest are cancelled.

    Cancelling takes a queued face out of the batcher, or an image not yet started off the
    prepare threads, so no work is done for an answer nobody will read.
    """
    try:
        return await asyncio.gather(*(asyncio.wrap_future(f) if isinstance(f, Future) else f for f in futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def is_quick(data: bytes) -> bool:
    """True for a small face crop (by its header) that is cheaper to prepare inline than in a thread."""
    if len(data) > QUICK_MAX_BYTES:
        return False
    size = peek_size(data)
    return size is not None and size[0] * size[1] <= QUICK_MAX_PIXELS and min(size) <= FACE_CROP_MAX_SIDE


class Engine:
    """Loads once at start-up; `ready` turns true after the warm-up."""

    def __init__(self, predictor: Predictor, config: EngineConfig) -> None:
        self._predictor = predictor
        self.config = config
        self._detector = build_detector(config.detector, config.detector_model)
        self._batcher = MicroBatcher(predictor, config.max_batch, config.max_wait_ms, config.queue_size)
        self._batcher.add_room_listener(self._announce_room)
        # One admission queue per event loop (an asyncio lock belongs to one loop); the service
        # has one, and a CLI or a test may run several loops one after the other.
        self._rooms: dict[asyncio.AbstractEventLoop, QueueRoom] = {}
        self._rooms_lock = threading.Lock()
        # A few threads, not one per request: decoding and detection are CPU-bound (OpenCV and
        # Pillow release the GIL), so more threads than cores only add contention and memory.
        self._prepare_pool = ThreadPoolExecutor(config.prepare_workers, thread_name_prefix="fer-prepare")
        self._ready = threading.Event()
        self._pending_lock = threading.Lock()
        # Pixels to decode of the uploads on or waiting for the prepare threads, per request.
        self._pending_by_owner: dict[object, int] = {}

    @classmethod
    def load(cls, checkpoint: Path, config: EngineConfig | None = None) -> Engine:
        """Load the checkpoint and the face detector; raises `CheckpointError` or `DetectorError` with one line."""
        config = config or EngineConfig()
        torch.set_num_threads(config.threads)
        cv2.setNumThreads(config.opencv_threads)  # process-wide, like torch's
        predictor = Predictor.from_checkpoint(
            checkpoint, precision=config.precision, tta=config.tta, threads=config.threads
        )
        return cls(predictor, config)

    @property
    def detector_name(self) -> str:
        """Which face detector searches photos."""
        return self._detector.name

    # What is served.

    @property
    def model(self) -> ModelInfo:
        """The served checkpoint's version and sha256, and the precision that serves it."""
        checkpoint = self._predictor.checkpoint
        return ModelInfo(version=checkpoint.version, sha256=checkpoint.sha256, precision=self.precision)

    @property
    def checkpoint_path(self) -> Path:
        """The file the model was loaded from."""
        return self._predictor.checkpoint.path

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in the order of every answer's probabilities."""
        return self._predictor.classes

    @property
    def precision(self) -> str:
        """ "fp32", "bf16" or "int8": what the forward pass runs in ("auto" resolved)."""
        return self._predictor.precision

    @property
    def measured_precisions(self) -> tuple[str, ...]:
        """The precisions whose val figures the checkpoint stores."""
        return self._predictor.checkpoint.measured_precisions()

    @property
    def precision_speeds(self) -> dict[str, dict[int, float]]:
        """Faces/s per batch size of each path "auto" timed at start-up ({} when it timed none)."""
        return self._predictor.speeds

    @property
    def served_tta(self) -> TtaMode:
        """The TTA mode of a request that names none."""
        return self._predictor.tta

    def resolve_tta(self, tta: TtaMode | None) -> TtaMode:
        """The mode a request asking for `tta` (None: the served one) is answered with."""
        return self._predictor.resolve_tta(tta)

    def measured_tta_modes(self) -> tuple[TtaMode, ...]:
        """The TTA modes whose evaluation figures describe this server, the one it was measured with first."""
        checkpoint = self._predictor.checkpoint
        return checkpoint.measured_tta_modes(self._measured_precision)

    @property
    def _measured_precision(self) -> str | None:
        """The served precision where the checkpoint stores its figures, else None (the main figures)."""
        precision = self.precision
        return precision if precision in self._predictor.checkpoint.measured_precisions() else None

    def metrics(self, tta: TtaMode | None = None) -> dict[str, Any]:
        """The stored evaluation figures that describe serving with `tta`.

        The figures measured in the served precision where the checkpoint has them, else its main
        ones (their "precision" says which). With no `tta`: the served mode's figures where they are
        stored, else the main ones (their "tta" says which mode they describe), else {} for a
        checkpoint never evaluated.

        Raises:
            NotMeasuredError: `tta` was asked for and the checkpoint has no figures for it.
        """
        checkpoint = self._predictor.checkpoint
        precision = self._measured_precision
        if tta is None:
            served = checkpoint.metrics_for(self.served_tta, precision)
            main = (
                checkpoint.metrics_for(self.measured_tta_modes()[0], precision) if self.measured_tta_modes() else None
            )
            return served if served is not None else main or {}
        mode = self.resolve_tta(tta)
        figures = checkpoint.metrics_for(mode, precision)
        if figures is None:
            measured = ", ".join(self.measured_tta_modes()) or "nothing yet"
            raise NotMeasuredError(
                f"this checkpoint stores no figures measured with tta={mode}; it has them for: {measured} "
                f"(training.evaluate --also-tta {mode} --write-metrics adds them)"
            )
        return figures

    @property
    def queue_depth(self) -> int:
        """Faces waiting for a forward pass."""
        return self._batcher.queue_depth

    @property
    def ready(self) -> bool:
        """True once the warm-up has run."""
        return self._ready.is_set()

    def warm_up(self) -> None:
        """Build oneDNN kernels for the batch sizes the batcher forms, then declare readiness."""
        self._predictor.warm_up((1, 2, 4, 8, min(32, self.config.max_batch), self.config.max_batch))
        self._ready.set()

    # The calls.

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
        faces = prepared.faces
        futures: list[Future[BatchResult]] = []
        try:
            for face in faces:
                futures.append(self._batcher.submit(face.inputs, mode))
        except QueueFullError:
            for future in futures:  # the faces that did fit are taken back out
                future.cancel()
            raise
        results = await gather_or_cancel(futures)
        answers = tuple(self._answer(face, result) for face, result in zip(faces, results, strict=True))
        return ImageAnswer(answers, mode, prepared.search)

    async def classify_batch(
        self, uploads: Sequence[bytes], *, require_face: bool = False, tta: TtaMode | None = None
    ) -> list[ImageAnswer | FerError]:
        """Several uploads → each one's largest face, or the error that takes its place, in order.

        The faces wait for room in the queue (taking turns with other batch uploads) up to
        `batch_patience_s`; past it the whole call raises `QueueFullError`, since capacity is not
        any one image's fault.
        """
        mode = self.resolve_tta(tta)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_patience_s
        costs = [decode_cost(data, self.config.decode_max_side) for data in uploads]
        total = sum(costs)
        if total > self.config.max_batch_pixels:
            raise ImageTooLargeError(
                f"the batch's images add up to {total:,} pixels to decode, over the limit of "
                f"{self.config.max_batch_pixels:,}: send fewer or smaller images per request"
            )
        # A batch's images go to the prepare threads a few at a time (as many as there are
        # threads), so a batch alone never fills the admission bound with its own images; one
        # refused image fails the batch, and its siblings are cancelled.
        owner, turns = object(), asyncio.Semaphore(self.config.prepare_workers)
        prepared = await gather_or_cancel(
            [
                asyncio.ensure_future(self._prepare_one(data, cost, require_face, owner, turns))
                for data, cost in zip(uploads, costs, strict=True)
            ]
        )
        faces = [item.faces[0] for item in prepared if isinstance(item, PreparedImage)]
        if not faces:  # every upload failed: nothing to wait for room for
            return [item for item in prepared if not isinstance(item, PreparedImage)]
        futures = await self._room(loop).submit_all(
            lambda face: self._batcher.submit(face.inputs, mode), faces, deadline
        )
        results = iter(await gather_or_cancel(futures))
        return [
            ImageAnswer((self._answer(item.faces[0], next(results)),), mode, item.search)
            if isinstance(item, PreparedImage)
            else item
            for item in prepared
        ]

    async def classify_video(
        self,
        path: Path,
        *,
        fps: float | None = None,
        tta: TtaMode | None = None,
        smooth_s: float | None = None,
        on_frame: Callable[[SampledFrame, int], None] | None = None,
    ) -> Timeline:
        """A video file → every face tracked through it, with raw and smoothed probabilities per analysed frame.

        `fps` frames per second of video are analysed (default and most: `video_fps`). Frames are
        read and searched on the prepare threads, a few ahead of the forward passes; their faces
        go through the same batching queue as images'. `on_frame(frame, faces)` is called as
        each frame's answer is in. Cancelling the call (a client that left) stops the reading
        and takes its queued faces out.

        Raises:
            UnsupportedVideoError, InvalidVideoError, VideoTooLargeError: a bad video.
            QueueFullError: over capacity.
        """
        config = self.config
        rate = min(fps or config.video_fps, config.video_fps)
        mode = self.resolve_tta(tta)
        loop = asyncio.get_running_loop()
        reader = await loop.run_in_executor(
            self._prepare_pool, lambda: VideoReader(path, max_side=config.video_max_side)
        )
        window: deque[tuple[SampledFrame, asyncio.Future[tuple[FaceAnswer, ...]]]] = deque()
        # A face unseen for 1 s ends its track, or for two and a half sampling intervals when
        # those are longer (a low rate asked for, or a source with fewer frames than that).
        interval = max(1.0 / rate, 1.0 / reader.info.fps if reader.info.fps > 0 else 0.0)
        tracker = Tracker(
            smooth_s=config.video_smooth_s if smooth_s is None else smooth_s, max_gap_s=max(MAX_GAP_S, 2.5 * interval)
        )
        classes = self.classes
        analysed, last_t = 0, 0.0
        try:
            reader.check_size(config.max_video_seconds, config.max_video_pixels)
            samples = reader.samples(rate, config.max_video_seconds, config.max_video_pixels)

            async def settle_first() -> None:
                nonlocal analysed, last_t
                frame, pending = window.popleft()
                answers = await pending
                tracker.update(
                    frame.t,
                    frame.index,
                    [(answer.box, np.array([answer.prediction.probabilities[c] for c in classes])) for answer in answers
                     if answer.box is not None],
                )  # fmt: skip
                analysed, last_t = analysed + 1, frame.t
                if on_frame is not None:
                    on_frame(frame, len(answers))

            while (frame := await loop.run_in_executor(self._prepare_pool, reader.next_sample, samples)) is not None:
                window.append((frame, asyncio.ensure_future(self._classify_frame(frame, mode))))
                while window and (len(window) > config.prepare_workers or window[0][1].done()):
                    await settle_first()
            while window:
                await settle_first()
        finally:
            try:  # after a read still running on a prepare thread (the reader's lock), never during it
                self._prepare_pool.submit(reader.close)
            except RuntimeError:  # the pool is shut down: nothing else reads
                reader.close()
            for _, pending in window:
                pending.cancel()
            # Collected, so a frame that failed beside the one that ended the call is not logged
            # as a never-retrieved exception.
            await asyncio.gather(*(pending for _, pending in window), return_exceptions=True)
        if analysed == 0:
            raise InvalidVideoError("the video has no readable frames: it is empty, truncated or damaged")
        step = 1.0 / rate
        duration = reader.info.duration_s or last_t + step
        return Timeline(
            fps=rate,
            duration_s=duration,
            frames_analysed=analysed,
            classes=classes,
            tracks=tuple(tracker.tracks),
            summaries=tuple(summarise(track, classes, step, duration) for track in tracker.tracks),
            tta=mode,
        )

    def close(self) -> None:
        """Stop the prepare and batching threads; photos not yet started are dropped, not decoded.

        A decode already running is not waited for (it ends within `decode_timeout_s` on its
        own), so shutting down is bounded whatever the prepare threads are doing.
        """
        # Not waiting: a decode still running ends by its own deadline, and at shutdown the
        # process should not wait for it (uvicorn ends the process once the lifespan is done).
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._batcher.remove_room_listener(self._announce_room)
        self._batcher.close()

    # Internals.

    def _prepare_faces(self, data: bytes, all_faces: bool, require_face: bool) -> PreparedImage:
        """Decode, find the face(s) and preprocess: one input per face, the whole image when none is usable.

        A JPEG photo is decoded at reduced scale (`decode_max_side`); faces are cut from that
        and their boxes and landmarks given back in the upload's pixels.
        """
        config = self.config
        photo = decode_photo(
            data, max_pixels=config.max_pixels, max_side=config.decode_max_side, timeout_s=config.decode_timeout_s
        )
        spec = self._predictor.checkpoint.preprocessing
        if min(photo.full_size) <= FACE_CROP_MAX_SIDE:  # by the upload's size, not the reduced decode's
            return PreparedImage([FaceInput(preprocess(photo.image, spec), None)], None)
        policy = FacePolicy(
            all_faces=all_faces,
            max_faces=config.max_faces,
            min_face_px=config.min_face_px / photo.scale,  # the limit is in the upload's pixels
            detect_max_side=config.detect_max_side,
        )
        gray = to_grayscale(photo.image)
        rgb = np.asarray(to_rgb(photo.image))
        search = find_faces(rgb, np.asarray(gray), self._detector, policy)
        width, height = photo.full_size
        search = search.scaled(photo.scale, width, height)
        if search.faces:
            return PreparedImage(
                [FaceInput(preprocess(face.image, spec), face.detected) for face in search.faces], search
            )
        if require_face:
            if search.too_small:
                raise NoFaceError(
                    f"the {search.too_small} face(s) found are smaller than {config.min_face_px} px: send a photo "
                    "where the face is larger, or drop require_face"
                )
            raise NoFaceError("no face was found in the image: send a photo with a visible face, or drop require_face")
        return PreparedImage([FaceInput(preprocess(gray, spec), None)], search)

    async def _prepare(
        self,
        data: bytes,
        *,
        all_faces: bool,
        require_face: bool,
        owner: object | None = None,
        cost: int | None = None,
    ) -> PreparedImage:
        """Small face crops inline, anything that may need face detection on the prepare threads.

        `owner` is the request the image belongs to (a batch upload's images share one): an
        image is always admitted when nothing of other requests waits, so a request never
        refuses itself, and one image up to the pixel limit is always served alone. `cost` is
        its `decode_cost`, when the caller has it already.

        Raises:
            QueueFullError: other requests' images already waiting to be decoded, with this one,
                add up to more than `max_pending_pixels`; it is refused at once instead of
                waiting behind them.
        """
        if is_quick(data):
            return self._prepare_faces(data, all_faces, require_face)
        owner = owner if owner is not None else object()
        # What will really be decoded: a 12-megapixel JPEG decodes at a quarter, 0.76 megapixels.
        pixels = decode_cost(data, self.config.decode_max_side) if cost is None else cost
        with self._pending_lock:
            own = self._pending_by_owner.get(owner, 0)
            others = sum(self._pending_by_owner.values()) - own  # a few requests at most: summed when asked
            if others and others + own + pixels > self.config.max_pending_pixels:
                raise QueueFullError(f"the service is decoding {others:,} pixels of other uploads: retry in a moment")
            self._pending_by_owner[owner] = own + pixels
        future = self._prepare_pool.submit(self._prepare_faces, data, all_faces, require_face)
        # Released when the work ends (or is cancelled before it starts), not when the caller
        # stops waiting: a decode that runs on after its client left still holds the cores.
        future.add_done_callback(lambda _: self._release_pending(owner, pixels))
        return await asyncio.wrap_future(future)

    def _release_pending(self, owner: object, pixels: int) -> None:
        with self._pending_lock:
            left = self._pending_by_owner.pop(owner, 0) - pixels
            if left > 0:
                self._pending_by_owner[owner] = left
        release_memory_after(pixels)  # on the prepare thread: the decoded image is gone by now

    async def _prepare_one(
        self, data: bytes, cost: int, require_face: bool, owner: object, turns: asyncio.Semaphore
    ) -> PreparedImage | FerError:
        """One upload of a batch prepared for its largest face, or its error in its place."""
        try:
            async with turns:
                return await self._prepare(data, all_faces=False, require_face=require_face, owner=owner, cost=cost)
        except QueueFullError:
            raise  # capacity is not this image's fault: the whole upload gets 503
        except FerError as exc:
            return exc

    async def _classify_frame(self, frame: SampledFrame, mode: TtaMode) -> tuple[FaceAnswer, ...]:
        """Every face of one video frame (up to `max_faces`), classified; () when there is none."""
        loop = asyncio.get_running_loop()
        faces = await loop.run_in_executor(self._prepare_pool, self._prepare_frame, frame)
        if not faces:
            return ()
        # Like a batch upload's faces, a frame's wait their turn for room in the queue (up to
        # `batch_patience_s`) rather than failing the whole video on a moment's full queue.
        deadline = loop.time() + self.config.batch_patience_s
        futures = await self._room(loop).submit_all(
            lambda face: self._batcher.submit(face.inputs, mode), faces, deadline
        )
        results = await gather_or_cancel(futures)
        return tuple(self._answer(face, result) for face, result in zip(faces, results, strict=True))

    def _prepare_frame(self, frame: SampledFrame) -> list[FaceInput]:
        """A frame's faces ready for the network, boxes in the frame's own pixels."""
        config = self.config
        policy = FacePolicy(
            all_faces=True,
            max_faces=config.max_faces,
            min_face_px=config.min_face_px / frame.scale,
            detect_max_side=config.detect_max_side,
        )
        gray = cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2GRAY)
        search = find_faces(frame.rgb, gray, self._detector, policy).scaled(frame.scale, *frame.size)
        spec = self._predictor.checkpoint.preprocessing
        return [FaceInput(preprocess(face.image, spec), face.detected) for face in search.faces]

    def _answer(self, face: FaceInput, result: BatchResult) -> FaceAnswer:
        prediction = self._predictor.to_predictions(result.probabilities[None, :])[0]
        return FaceAnswer(prediction=prediction, detected=face.detected, batch_size=result.batch_size)

    def _room(self, loop: asyncio.AbstractEventLoop) -> QueueRoom:
        room = self._rooms.get(loop)
        if room is None:
            with self._rooms_lock:  # two loops in two threads must not drop each other's room
                room = self._rooms.get(loop) or QueueRoom(loop)
                # Copy on write: the batcher's thread reads the rooms without a lock. Closed loops go.
                kept = {known: other for known, other in self._rooms.items() if not known.is_closed()}
                self._rooms = kept | {loop: room}
        return room

    def _announce_room(self) -> None:
        """Room was freed in the queue: called from the batcher's worker thread."""
        for room in self._rooms.values():
            room.notify_threadsafe()
