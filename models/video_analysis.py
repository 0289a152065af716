"""A video's analysis: frames read a few ahead of the forward passes, faces tracked, the timeline shaped.

The engine gives the per-frame step (its face pipeline and forward passes, the same as a
photo's); this module reads the sampled frames on a video thread within the video's limits,
keeps a window of frames in flight (as many as there are prepare threads), feeds each frame's
answers to the tracker in order, and when the caller goes away stops the reading, cancels what
is queued and returns only once the reader has stopped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.answers import FaceAnswer
from models.config import EngineConfig
from models.errors import InvalidVideoError
from models.scheduling import Scheduler
from models.tracking import MAX_GAP_S, Tracker, summarise
from models.tta import TtaMode
from models.video import SampledFrame, Timeline, VideoLimits, VideoReader

FrameStep = Callable[[SampledFrame], Awaitable[tuple[FaceAnswer, ...]]]
FrameListener = Callable[[SampledFrame, int], None]


@dataclass(frozen=True)
class VideoRequest:
    """What a caller asked of one video: the rate, smoothing and mode it is analysed with."""

    rate: float  # frames analysed per second of video
    smooth_s: float
    tta: TtaMode


async def analyse_video(
    path: Path,
    request: VideoRequest,
    config: EngineConfig,
    scheduler: Scheduler,
    classify_frame: FrameStep,
    classes: tuple[str, ...],
    on_frame: FrameListener | None = None,
) -> Timeline:
    """Every face tracked through the video at `path`, with raw and smoothed probabilities per analysed frame.

    Raises:
        UnsupportedVideoError, InvalidVideoError, VideoTooLargeError: a bad video.
        QueueFullError: over capacity.
    """
    limits = VideoLimits(
        max_seconds=config.max_video_seconds,
        max_pixels=config.max_video_pixels,
        max_frame_pixels=config.max_pixels,
        timeout_s=config.video_timeout_s,
    )
    reader = await scheduler.run_video(VideoReader, path, limits, config.video_max_side)
    window: deque[tuple[SampledFrame, asyncio.Future[tuple[FaceAnswer, ...]]]] = deque()
    # A face unseen for 1 s ends its track, or for two and a half sampling intervals when
    # those are longer (a low rate asked for, or a source with fewer frames than that).
    interval = max(1.0 / request.rate, 1.0 / reader.info.fps if reader.info.fps > 0 else 0.0)
    tracker = Tracker(smooth_s=request.smooth_s, max_gap_s=max(MAX_GAP_S, 2.5 * interval))
    analysed, last_t = 0, 0.0

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

    try:
        reader.check_size()
        samples = reader.samples(request.rate)
        while (frame := await scheduler.run_video(reader.next_sample, samples)) is not None:
            window.append((frame, asyncio.ensure_future(classify_frame(frame))))
            while window and (len(window) > config.prepare_workers or window[0][1].done()):
                await settle_first()
        while window:
            await settle_first()
    finally:
        reader.stop()  # a read still running on its video thread ends at its next packet
        for _, pending in window:
            pending.cancel()
        # Collected, so a frame that failed beside the one that ended the call is not logged as
        # a never-retrieved exception.
        await asyncio.gather(*(pending for _, pending in window), return_exceptions=True)
        # Closed once the running read has seen the stop (the reader's lock): the caller's job
        # slot is held until then, so a video that was left does not decode on beside the next.
        await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, reader.close))
    if analysed == 0:
        raise InvalidVideoError("the video has no readable frames: it is empty, truncated or damaged")
    step = 1.0 / request.rate
    duration = reader.info.duration_s or last_t + step
    return Timeline(
        fps=request.rate,
        duration_s=duration,
        frames_analysed=analysed,
        classes=classes,
        tracks=tuple(tracker.tracks),
        summaries=tuple(summarise(track, classes, step, duration) for track in tracker.tracks),
        tta=request.tta,
    )
