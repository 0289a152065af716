"""Bounded video: what is decoded is counted as it is, decoding stops when its caller leaves, photos keep their threads.

The hostile files are made here: MJPEG frames in an AVI are independent JPEGs, so a file can
declare 16×16 and carry frames of any size (`tests.images.mjpeg_avi`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.checkpoint import SHIPPED_CHECKPOINT
from models.config import EngineConfig
from models.engine import Engine
from models.errors import QueueFullError, VideoTooLargeError
from models.video import SampledFrame, VideoReader
from tests.images import face_png, mjpeg_avi, plain_jpeg, write_clip

LIMITS = {"max_pixels": 4_000_000, "max_video_pixels": 50_000_000, "max_video_seconds": 10.0}


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loaded = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, **LIMITS))
    yield loaded
    loaded.close()


def analyse(engine: Engine, path: Path) -> Any:
    return asyncio.run(engine.classify_video(path))


def test_a_frame_larger_than_the_header_declares_is_refused_by_the_decoder(engine: Engine, tmp_path: Path) -> None:
    # Declared 16×16; the second frame is 3000×3000 (9 MP, over the 4 MP frame limit).
    path = tmp_path / "grows.avi"
    path.write_bytes(mjpeg_avi([plain_jpeg(16, 16), plain_jpeg(3000, 3000)], declared=(16, 16), fps=10))
    with pytest.raises(VideoTooLargeError, match="a frame of the video is over the limit of 4,000,000 pixels"):
        analyse(engine, path)


def test_frames_over_the_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "vga.mp4", [[(100, 150)]] * 5)  # 640×480: 307,200 pixels a frame
    small = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, max_pixels=200_000))
    try:
        # FFmpeg refuses the frames already while it probes the file, before any is decoded for us.
        with pytest.raises(VideoTooLargeError, match=r"a frame of the video is over the limit of 200,000 pixels"):
            analyse(small, clip)
    finally:
        small.close()


def test_every_decoded_frame_counts_at_its_real_size_sampled_or_not(engine: Engine, tmp_path: Path) -> None:
    # Declared 16×16 at 1,000,000 frames/s (not believed): 30 frames of 1500×1500 stamped 1 µs apart.
    # Only the first is sampled; all thirty are decoded, 67.5 M pixels against a 50 M limit.
    frames = [plain_jpeg(16, 16)] + [plain_jpeg(1500, 1500)] * 30
    path = tmp_path / "dense.avi"
    path.write_bytes(mjpeg_avi(frames, declared=(16, 16), fps=1_000_000))
    with pytest.raises(VideoTooLargeError, match="more than 50,000,000 pixels to decode"):
        analyse(engine, path)


def test_frames_are_bounded_whatever_their_timestamps_say(engine: Engine, tmp_path: Path) -> None:
    # 10 s at most: 2,401 frames at the 240 frames/s believed at most, though these span 3 ms.
    path = tmp_path / "many.avi"
    path.write_bytes(mjpeg_avi([plain_jpeg(16, 16)] * 2500, declared=(16, 16), fps=1_000_000))
    with pytest.raises(VideoTooLargeError, match="more than 2,401 frames"):
        analyse(engine, path)


class GatedReader(VideoReader):
    """A reader whose reads wait for `release` after announcing themselves on `reading`; it records its close."""

    reading = threading.Semaphore(0)
    release = threading.Event()
    instances: list[GatedReader] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = False
        GatedReader.instances.append(self)

    def next_sample(self, samples: Iterator[SampledFrame]) -> SampledFrame | None:
        GatedReader.reading.release()
        GatedReader.release.wait(60)
        return super().next_sample(samples)

    def close(self) -> None:
        super().close()
        self.closed = True


@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[GatedReader]]:
    GatedReader.reading = threading.Semaphore(0)
    GatedReader.release = threading.Event()
    GatedReader.instances = []
    monkeypatch.setattr("models.video_analysis.VideoReader", GatedReader)
    yield GatedReader
    GatedReader.release.set()


def test_photos_are_answered_while_two_videos_hold_their_threads(gated: type[GatedReader], tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "walk.mp4", [[(100, 150)]] * 10)
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, max_video_jobs=2))

    async def run() -> None:
        videos = [asyncio.ensure_future(engine.classify_video(clip)) for _ in range(2)]
        for _ in range(2):  # both video threads are inside a read, held
            assert await asyncio.to_thread(gated.reading.acquire, True, 60), "a video never started reading"
        answer = await engine.classify(face_png(3))  # a photo, while both videos hold their threads
        assert answer.faces and not any(video.done() for video in videos)
        gated.release.set()
        timelines = await asyncio.gather(*videos)
        assert all(timeline.frames_analysed == 5 for timeline in timelines)

    try:
        asyncio.run(run())
    finally:
        engine.close()


def test_a_cancelled_analysis_returns_only_once_its_reader_has_stopped(
    engine: Engine, gated: type[GatedReader], tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "walk.mp4", [[(100, 150)]] * 30)

    async def run() -> None:
        analysis = asyncio.ensure_future(engine.classify_video(clip))
        assert await asyncio.to_thread(gated.reading.acquire, True, 60)
        analysis.cancel()
        gated.release.set()  # the read in progress goes on to its end: the analysis waits for it
        with pytest.raises(asyncio.CancelledError):
            await analysis
        (reader,) = gated.instances
        assert reader.closed, "the analysis ended while its reader could still be decoding"
        frames = reader.frames_decoded
        assert frames < 30
        assert reader.next_sample(iter(())) is None  # stopped: nothing more is read

    asyncio.run(run())


def test_the_analysis_slots_are_counted_and_the_refusal_says_so() -> None:
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, max_video_jobs=1))

    async def run() -> None:
        async with engine.video_job():
            assert engine.video_jobs == 1
            with pytest.raises(QueueFullError, match="already analysing 1 videos"):
                async with engine.video_job():
                    pass
        assert engine.video_jobs == 0

    try:
        asyncio.run(run())
    finally:
        engine.close()
