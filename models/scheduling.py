"""Scheduling: where an upload's work runs, and what is admitted while the service is busy.

- The prepare pool: a few threads (one per core) decode photos and search them for faces, so
  the event loop never does; a small face crop is cheap enough to prepare inline (`runs_inline`).
  Videos have threads of their own (one per video analysed, at a lower priority).
- Pixel admission (`models/pixel_admission.py`): the pixels of the photos on or waiting for
  the prepare threads are counted per request; a photo that would take them past
  `max_pending_pixels` gets `QueueFullError` at once, a batch upload's image waits in line.
- Waiting for room (`QueueTurns`): a batch upload's or a video frame's faces wait their turn
  for room in the batching queue up to a deadline; a single photo that finds it full is refused.
- The video-job cap: at most `max_video_jobs` videos are analysed at once.
- `infer`: the one submit-and-wait step from faces to the batcher's results; a caller that goes
  away cancels what it queued.

Waiting for room, in detail: a single image that finds the queue full gets 503 at once. A `/predict/batch` upload brings up
to `max_batch_files` faces: refusing the ones that do not fit would fail a request the service
can finish in a moment, so its faces wait for room, up to a deadline. Uploads take turns in
arrival order (an asyncio lock is first come, first served), so each one's faces go into the
queue together and the first upload finishes first, instead of every upload's faces
interleaving and all of them finishing late. The waiting is woken by the batcher's worker each
time it takes a batch off the queue: no polling, so a crowd of waiting uploads costs the event
loop nothing while the forward passes run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from models.batching import BatchResult, MicroBatcher
from models.config import EngineConfig
from models.decoding import ImageHeader, is_face_crop_size, looks_like_image, read_header
from models.errors import FerError, ImageTooLargeError, QueueFullError
from models.heap_release import release_memory_after
from models.pixel_admission import PixelAdmission
from models.tta import TtaMode

Item = TypeVar("Item")
Result = TypeVar("Result")

# A face crop this small decodes and preprocesses in about 0.1 ms with no face detection, less
# than handing it to a worker thread and back costs; anything larger goes to a thread.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 128 * 128
# Formats whose decoding work follows the size their header gives. Not AVIF (its AV1 frame may be
# far larger than its `ispe` box says: 12000×12000 behind 64×48, 0.4 s and 300 MB), nor HEIF or
# TIFF (one uninterruptible call; tiles): those crops go to a prepare thread, never the event loop.
INLINE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})


# Video threads' niceness: above the prepare threads' 0, so under load a photo's decode gets the
# core first; not 19, so that a video still progresses beside steady photo traffic.
VIDEO_NICENESS = 10


def lower_thread_priority() -> None:
    """Run the calling thread at `VIDEO_NICENESS` (Linux: threads have their own niceness)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VIDEO_NICENESS)


def runs_inline(data: bytes, header: ImageHeader | None) -> bool:
    """True for a small face crop (by its header) that is cheaper to prepare inline than on a thread."""
    if len(data) > INLINE_MAX_BYTES or header is None or header.format not in INLINE_FORMATS:
        return False
    return header.width * header.height <= INLINE_MAX_PIXELS and is_face_crop_size(header.width, header.height)


def detached(exc: FerError) -> FerError:
    """The error alone, to keep as an answer: no traceback or chained error holding the upload's frames.

    An error returned in an image's place would otherwise keep its traceback's frames, and with
    them the upload's bytes, alive until the cyclic garbage collector runs (the frame that caught
    it holds it too): a folder of 300 MB files grew the CLI by 300 MB a file.
    """
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


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


class QueueTurns:
    """Turns and wake-ups for uploads waiting for room; lives on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._turn = asyncio.Lock()
        self._room = asyncio.Event()
        # True while an upload holds its turn: only then is a wake-up worth a trip through the
        # event loop, so /predict traffic alone costs the loop no extra wake-ups.
        self._submitting = False

    def notify_threadsafe(self) -> None:
        """Room was freed: called from the batcher's worker thread."""
        if self._submitting and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._room.set)

    async def submit_all(
        self, submit: Callable[[Item], Future[Result]], items: Sequence[Item], deadline: float
    ) -> list[Future[Result]]:
        """`submit` every item in order, waiting for room (and for this upload's turn) until `deadline`.

        `deadline` is in event-loop time. Raises `QueueFullError` when it passes first; the items
        already queued are then cancelled, so the service does not compute answers nobody reads.
        """
        futures: list[Future[Result]] = []
        try:
            async with asyncio.timeout_at(deadline), self._turn:
                # Raised before the first try, so no room freed after a failed try goes unannounced.
                self._submitting = True
                try:
                    for item in items:
                        while True:
                            # Clear before trying: a wake-up that arrives after a failed try is kept.
                            self._room.clear()
                            try:
                                futures.append(submit(item))
                                break
                            except QueueFullError:
                                await self._room.wait()
                finally:
                    self._submitting = False
        except BaseException as exc:
            # A deadline passed or the caller went away: what was queued is computed for nobody.
            for future in futures:
                future.cancel()
            if not isinstance(exc, TimeoutError):
                raise
            raise QueueFullError(
                f"the service is at capacity: this request's {len(items)} faces waited their turn for room in the "
                "queue until the deadline; retry in a moment, or send fewer images per request"
            ) from None
        return futures


class Scheduler:
    """The prepare pool, pixel admission, the queue turns and the video-job cap of one engine."""

    def __init__(self, batcher: MicroBatcher, config: EngineConfig) -> None:
        self._batcher = batcher
        self._config = config
        # A few threads, not one per request: decoding and detection are CPU-bound (OpenCV and
        # Pillow release the GIL), so more threads than cores only add contention and memory.
        self._pool = ThreadPoolExecutor(config.prepare_workers, thread_name_prefix="fer-prepare")
        self._admission = PixelAdmission(config.max_pending_pixels)
        # One set of turns per event loop (an asyncio lock belongs to one loop); the service has
        # one, and a CLI or a test may run several loops one after the other.
        self._turns: dict[asyncio.AbstractEventLoop, QueueTurns] = {}
        self._turns_lock = threading.Lock()
        self._batcher.add_room_listener(self._announce_room)
        # Videos decode and are searched on threads of their own, one per video being analysed,
        # at a lower CPU priority: a video never takes a photo's prepare thread, and a photo's
        # decode wins the core over a frame's.
        self._video_pool = ThreadPoolExecutor(
            config.max_video_jobs, thread_name_prefix="fer-video", initializer=lower_thread_priority
        )
        self.video_jobs = 0

    async def run_video(self, work: Callable[..., Result], *args: Any) -> Result:
        """`work(*args)` on a video thread (reading a video, searching its frames)."""
        return await asyncio.get_running_loop().run_in_executor(self._video_pool, work, *args)

    async def prepare(
        self,
        data: bytes,
        work: Callable[[threading.Event], Result],
        owner: object | None = None,
        header: ImageHeader | None = None,
        *,
        wait: bool = False,
    ) -> Result:
        """`work()` (decoding and the face search of `data`) inline for a small face crop, else on a prepare thread once admitted.

        The header is read here, once, before any pixel is decoded (unless the caller has it);
        an upload whose size cannot be read from it counts as the largest image accepted.
        """
        header = header or read_header(data, self._config.decode_max_side)
        too_large = header is not None and header.width * header.height > self._config.max_pixels
        if too_large or runs_inline(data, header):  # refused from its header (413) at once, whatever the load
            return work(threading.Event())
        return await self.run_admitted(work, self._cost(data, header), owner, wait=wait)

    def _cost(self, data: bytes, header: ImageHeader | None) -> int:
        """Pixels to admit an upload with: what its header says it decodes; for an image whose size
        cannot be read, the pixel limit (it may be that large); for bytes that are no image, nothing."""
        if header is not None:
            return header.cost
        return self._config.max_pixels if looks_like_image(data) else 0

    async def prepare_each(
        self, uploads: Sequence[bytes], work: Sequence[Callable[[threading.Event], Result]]
    ) -> list[Result | FerError]:
        """`prepare` for each of one request's uploads: each one's result, or the error that takes its place.

        They go to the prepare threads a few at a time (as many as there are threads), so a
        batch alone never fills the admission bound with its own images. `QueueFullError` fails
        the whole call and cancels the rest: capacity is not any one image's fault.

        Raises:
            ImageTooLargeError: the uploads add up to more than `max_batch_pixels` to decode.
        """
        headers = [read_header(data, self._config.decode_max_side) for data in uploads]
        total = sum(self._cost(data, header) for data, header in zip(uploads, headers, strict=True))
        if total > self._config.max_batch_pixels:
            raise ImageTooLargeError(
                f"the batch's images add up to {total:,} pixels to decode, over the limit of "
                f"{self._config.max_batch_pixels:,}: send fewer or smaller images per request"
            )
        owner, turns = object(), asyncio.Semaphore(self._config.prepare_workers)

        async def prepare_one(
            data: bytes, header: ImageHeader | None, one: Callable[[threading.Event], Result]
        ) -> Result | FerError:
            try:
                async with turns:
                    return await self.prepare(data, one, owner, header, wait=True)
            except QueueFullError:
                raise
            except FerError as exc:
                return detached(exc)

        return await gather_or_cancel(
            [asyncio.ensure_future(prepare_one(*item)) for item in zip(uploads, headers, work, strict=True)]
        )

    async def run_admitted(
        self, work: Callable[[threading.Event], Result], pixels: int, owner: object | None = None, *, wait: bool = False
    ) -> Result:
        """`work(stop)` on a prepare thread, once its `pixels` to decode are admitted (`PixelAdmission`).

        `stop` is set when the caller goes away while the work runs: a decode ends at its next
        block rather than running on for nobody (work not yet started is simply dropped).

        `owner` is the request the work belongs to (a batch upload's images share one). With
        `wait` (a batch upload's images) the work waits in line for room up to
        `batch_patience_s`; without, it is refused at once when there is none.

        Raises:
            QueueFullError: no room to decode it (at once, or by the deadline).
        """
        owner = owner if owner is not None else object()
        if wait:
            deadline = asyncio.get_running_loop().time() + self._config.batch_patience_s
            await self._admission.admit_waiting(owner, pixels, deadline)
        else:
            self._admission.admit_now(owner, pixels)
        stop = threading.Event()
        try:
            future = self._pool.submit(work, stop)
        except BaseException:
            self._admission.release(owner, pixels)
            raise
        # Released when the work ends (or is cancelled before it starts), not when the caller
        # stops waiting: a decode still stopping holds the cores until it has.
        future.add_done_callback(lambda _: self._release(owner, pixels))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            stop.set()
            raise

    async def infer(self, inputs: Sequence[np.ndarray], mode: TtaMode, *, wait_for_room: bool) -> list[BatchResult]:
        """Each face through the batcher in `mode`; the results in order.

        Without `wait_for_room` a full queue refuses at once (a single photo: 503); with it the
        faces wait their turn for room up to `batch_patience_s` (a batch upload, a video frame).
        Either way, a failure or the caller going away takes this call's queued faces back out.

        Raises:
            QueueFullError: no room (at once, or by the deadline).
        """

        def submit(face: np.ndarray) -> Future[BatchResult]:
            return self._batcher.submit(face, mode)

        if wait_for_room:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._config.batch_patience_s
            futures = await self._turns_of(loop).submit_all(submit, inputs, deadline)
        else:
            futures = []
            try:
                for face in inputs:
                    futures.append(submit(face))
            except QueueFullError:
                for future in futures:  # the faces that did fit are taken back out
                    future.cancel()
                raise
        return await gather_or_cancel(futures)

    @contextlib.asynccontextmanager
    async def video_job(self) -> AsyncIterator[None]:
        """Hold one of the `max_video_jobs` slots for a video's analysis.

        Raises:
            QueueFullError: every slot is taken.
        """
        if self.video_jobs >= self._config.max_video_jobs:
            raise QueueFullError.videos_busy(self.video_jobs)
        self.video_jobs += 1
        try:
            yield
        finally:
            self.video_jobs -= 1

    def close(self) -> None:
        """Stop the prepare threads; work not yet started is dropped, work running is not waited for.

        A decode already running ends within `decode_timeout_s` on its own, and at shutdown the
        process should not wait for it (uvicorn ends the process once the lifespan is done).
        """
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._video_pool.shutdown(wait=False, cancel_futures=True)
        self._batcher.remove_room_listener(self._announce_room)

    def _release(self, owner: object, pixels: int) -> None:
        self._admission.release(owner, pixels)
        release_memory_after(pixels)  # on the prepare thread: the decoded image is gone by now

    def _turns_of(self, loop: asyncio.AbstractEventLoop) -> QueueTurns:
        turns = self._turns.get(loop)
        if turns is None:
            with self._turns_lock:  # two loops in two threads must not drop each other's turns
                turns = self._turns.get(loop) or QueueTurns(loop)
                # Copy on write: the batcher's thread reads them without a lock. Closed loops go.
                kept = {known: other for known, other in self._turns.items() if not known.is_closed()}
                self._turns = kept | {loop: turns}
        return turns

    def _announce_room(self) -> None:
        """Room was freed in the queue: called from the batcher's worker thread."""
        for turns in self._turns.values():
            turns.notify_threadsafe()
