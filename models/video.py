"""Video files: recognise the container, decode frames within limits, sample them, shape the timeline.

PyAV reads the frames (its wheel bundles FFmpeg: MP4, MOV, WebM, MKV, AVI). Every frame is
decoded, in order (a video codec cannot skip frames it has not decoded), but only the sampled
ones are converted, each scaled down to at most `max_side` pixels on its longer side before
face detection. What is decoded is counted as it is, not as the header declares it
(`VideoLimits`): the decoder itself refuses a frame larger than `max_frame_pixels` before it
allocates it (FFmpeg's `max_pixels`), every decoded frame's real size adds to the pixel count
(sampled or not), and the frames and the wall time of one video are bounded whatever its
timestamps say. The reading stops between packets when `stop()` is called from another thread.
The engine (`Engine.classify_video`) runs detection and the forward passes; `models/tracking.py`
follows the faces.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

import av
import av.error
import numpy as np

from models.errors import InvalidVideoError, UnsupportedVideoError, VideoTooLargeError
from models.tracking import Track, TrackSummary

# The containers the bundled FFmpeg reads, by their first bytes.
CONTAINERS = "MP4, MOV, WebM, MKV or AVI"
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
DEFAULT_FPS = 5.0
DEFAULT_SMOOTH_S = 0.5
DEFAULT_MAX_SIDE = 1280
# A header claiming more frames per second than this is not believed (a browser's WebM can say
# 1000): frame times then come from the frames' own timestamps.
MAX_SOURCE_FPS = 240.0
# ISO base media files that are images, not video (HEIC, AVIF): their brand, after "ftyp".
IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis")


def sniff_container(head: bytes) -> str | None:
    """The container a file's first 12+ bytes announce, or None when they announce no video we read."""
    if head[4:8] == b"ftyp" and head[8:12] in IMAGE_BRANDS:
        return None
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"free", b"wide"):
        return "mp4"  # ISO base media: MP4, MOV, M4V, 3GP
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # MKV and WebM
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: frames per second, frame count and size (0 where it does not say)."""

    fps: float
    frame_count: int
    width: int
    height: int

    @property
    def duration_s(self) -> float | None:
        """Length in seconds from the header; None when the header does not tell."""
        if self.fps > 0 and self.frame_count > 0:
            return self.frame_count / self.fps
        return None


@dataclass(frozen=True)
class SampledFrame:
    """One frame chosen for analysis: its time, its index in the file, its pixels (RGB, scaled down by `scale`)."""

    t: float
    index: int
    rgb: np.ndarray
    scale: float  # the frame's pixels per pixel of `rgb` (1 when not scaled down)
    size: tuple[int, int]  # the frame's own (width, height), before scaling


@dataclass(frozen=True)
class VideoLimits:
    """What one video may make the decoder do."""

    max_seconds: float  # of video, by its timestamps
    max_pixels: int  # decoded, all frames together, sampled or not
    max_frame_pixels: int  # one frame (the image limit); the decoder refuses a larger one
    timeout_s: float  # wall time reading it

    @property
    def max_frames(self) -> int:
        """Frames decoded at most: `max_seconds` at `MAX_SOURCE_FPS`, whatever the timestamps say."""
        return int(self.max_seconds * MAX_SOURCE_FPS) + 1


class VideoStopped(Exception):
    """The reading was stopped from another thread (`VideoReader.stop`)."""


class VideoReader:
    """An open video file; raises `UnsupportedVideoError` (not a video) or `InvalidVideoError` (undecodable)."""

    def __init__(self, path: Path, limits: VideoLimits, max_side: int = DEFAULT_MAX_SIDE) -> None:
        with Path(path).open("rb") as handle:
            head = handle.read(16)
        if not head:
            raise InvalidVideoError(f"the upload is empty: send a video ({CONTAINERS})")
        if sniff_container(head) is None:
            raise UnsupportedVideoError(f"this is not a video file the service reads: send {CONTAINERS}")
        try:
            # The frame limit from the start: FFmpeg decodes frames while it probes the streams,
            # inside open, with codec contexts that take the same options.
            self._container = av.open(
                str(path), metadata_errors="ignore", options={"max_pixels": str(limits.max_frame_pixels)}
            )
            stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError, ValueError):
            raise InvalidVideoError(
                "the video could not be opened: it is truncated or damaged, or it has no video track"
            ) from None
        self._stream = stream
        context = stream.codec_context
        # The decoder refuses a frame over the limit before allocating it ("Picture size … is
        # invalid"), wherever the stream changes size; one decoding thread: the engine bounds
        # how many videos decode at once, FFmpeg's own threads would not be.
        context.options = {"max_pixels": str(limits.max_frame_pixels)}
        context.thread_count = 1
        fps = float(stream.average_rate or 0.0)
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration and stream.time_base and fps > 0:
            frames = round(float(stream.duration * stream.time_base) * fps)
        self.info = VideoInfo(
            fps=fps if math.isfinite(fps) and 0 < fps <= MAX_SOURCE_FPS else 0.0,
            frame_count=max(0, frames),
            width=int(context.width or 0),
            height=int(context.height or 0),
        )
        self.max_side = max_side
        self.limits = limits
        self.frames_decoded = 0
        self.pixels_decoded = 0
        # Reads and the release take turns: a container closed under a running read would crash.
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def next_sample(self, samples: Iterator[SampledFrame]) -> SampledFrame | None:
        """The next of `samples` (from `samples()`), or None at the end; safe beside `stop` and `close` on another thread."""
        with self._lock:
            if self._stop.is_set():
                return None
            return next(samples, None)

    def stop(self) -> None:
        """Make a read running on another thread end at its next packet (it returns None)."""
        self._stop.set()

    def close(self) -> None:
        """Stop reading and release the file; waits for a read still running to see the stop."""
        self._stop.set()
        with self._lock:
            self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_size(self) -> None:
        """Refuse, from the header, a video longer than the limit, with frames over the frame limit, or too many pixels."""
        limits, info = self.limits, self.info
        duration = info.duration_s
        if duration is not None and duration > limits.max_seconds + 1e-6:
            raise VideoTooLargeError(
                f"the video is {duration:.1f} s long, over the limit of {limits.max_seconds:g} s: send a shorter clip"
            )
        if info.width * info.height > limits.max_frame_pixels:
            raise VideoTooLargeError(_frame_too_large(info.width, info.height, limits.max_frame_pixels))
        # Only with a believed frame rate: without one (WebM often), the frame count is made up,
        # and the count while reading decides instead.
        pixels = info.width * info.height * info.frame_count
        if info.fps > 0 and pixels > limits.max_pixels:
            raise VideoTooLargeError(_too_many_pixels(info.width, info.height, limits.max_pixels))

    def samples(self, fps: float) -> Iterator[SampledFrame]:
        """The frames at `fps` per second of video (the first frame, then one each 1/fps s), in order.

        Raises `VideoTooLargeError` on reaching a frame past `max_seconds`, more than
        `max_frames` frames, more than `max_pixels` decoded (each frame counted at its real
        size), a frame over `max_frame_pixels`, or `timeout_s` of reading; ends at `stop()`.
        """
        limits = self.limits
        step, next_t, index = 1.0 / fps, 0.0, -1
        deadline = monotonic() + limits.timeout_s
        for frame in self._frames():
            index += 1
            if index >= limits.max_frames:
                raise VideoTooLargeError(
                    f"the video has more than {limits.max_frames:,} frames ({limits.max_seconds:g} s at "
                    f"{MAX_SOURCE_FPS:g} frames/s): send a shorter clip, or one of fewer frames per second"
                )
            self.frames_decoded += 1
            self.pixels_decoded += frame.width * frame.height
            if self.pixels_decoded > limits.max_pixels:
                raise VideoTooLargeError(_too_many_pixels(frame.width, frame.height, limits.max_pixels))
            if monotonic() > deadline:
                raise VideoTooLargeError(
                    f"the video took more than {limits.timeout_s:g} s to decode and was stopped: send a shorter or "
                    "smaller clip"
                )
            t = self._frame_time(frame, index)
            if t > limits.max_seconds + 1e-6:
                raise VideoTooLargeError(
                    f"the video is longer than the limit of {limits.max_seconds:g} s: send a shorter clip"
                )
            if t + 1e-6 < next_t:
                continue
            next_t = max(next_t + step, t + step / 2)  # a long gap in the file does not make a burst of samples
            yield self._scaled(t, index, frame)

    def _frames(self) -> Iterator[av.VideoFrame]:
        """Every decoded frame, in order; stops between packets once `stop()` is called."""
        decoded = 0
        try:
            for packet in self._container.demux(self._stream):
                if self._stop.is_set():
                    raise VideoStopped
                for frame in packet.decode():
                    decoded += 1
                    yield frame
        except av.error.ArgumentError:
            # EINVAL from the decoder: av_image_check_size2 refused a frame over `max_pixels`
            # (damaged data is AVERROR_INVALIDDATA, an InvalidDataError).
            raise VideoTooLargeError(_frame_too_large(0, 0, self.limits.max_frame_pixels)) from None
        except av.error.FFmpegError:
            width, height = self.info.width, self.info.height
            if decoded == 0:
                raise InvalidVideoError("the video has no readable frames: it is empty, truncated or damaged") from None
            raise InvalidVideoError(
                f"frame {decoded} of the video ({width}x{height}) could not be decoded: it is damaged"
            ) from None

    def _frame_time(self, frame: av.VideoFrame, index: int) -> float:
        """The frame's own timestamp (variable frame rates too), else its index over the header's fps."""
        stamp = frame.time
        if stamp is not None and math.isfinite(stamp) and stamp > 0:
            return float(stamp)
        return index / self.info.fps if self.info.fps > 0 else 0.0

    def _scaled(self, t: float, index: int, frame: av.VideoFrame) -> SampledFrame:
        width, height = frame.width, frame.height
        scale = max(1.0, max(height, width) / self.max_side)
        size = (max(1, round(width / scale)), max(1, round(height / scale))) if scale > 1.0 else (width, height)
        rgb = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
        return SampledFrame(t, index, np.ascontiguousarray(rgb), scale, (width, height))


@dataclass(frozen=True)
class Timeline:
    """A video's answer: how it was sampled, and every track with its frames and summary."""

    fps: float  # frames analysed per second of video
    duration_s: float
    frames_analysed: int
    classes: tuple[str, ...]
    tracks: tuple[Track, ...]
    summaries: tuple[TrackSummary, ...]
    tta: str


def _frame_too_large(width: int, height: int, max_pixels: int) -> str:
    size = f" ({width}x{height} = {width * height:,} pixels)" if width and height else ""
    return f"a frame of the video is over the limit of {max_pixels:,} pixels{size}: send a smaller video"


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return (
        f"the video has more than {max_pixels:,} pixels to decode ({width}x{height} frames): "
        "send a shorter clip, or one of fewer pixels or frames per second"
    )
