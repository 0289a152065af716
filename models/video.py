"""Video files: recognise the container, read frames at a chosen rate, and shape the timeline.

OpenCV reads the frames (the opencv-python-headless wheel bundles FFmpeg: MP4, MOV, WebM, MKV,
AVI). Every frame is decoded, in order (`grab`; a video codec cannot skip frames it has not
decoded), but only the sampled ones are converted and kept, each scaled down to at most
`max_side` pixels on its longer side before face detection: an 8K frame costs one full-size
decode and no more memory than that. The pixels to decode are bounded (`max_pixels`), from the
header and again while reading, since the work grows with frame rate × size × length.
The engine (`Engine.classify_video`) runs detection and the forward passes; `models/tracking.py`
follows the faces.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
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


class VideoReader:
    """An open video file; raises `UnsupportedVideoError` (not a video) or `InvalidVideoError` (undecodable)."""

    def __init__(self, path: Path, *, max_side: int = DEFAULT_MAX_SIDE) -> None:
        with Path(path).open("rb") as handle:
            head = handle.read(16)
        if not head:
            raise InvalidVideoError(f"the upload is empty: send a video ({CONTAINERS})")
        if sniff_container(head) is None:
            raise UnsupportedVideoError(f"this is not a video file the service reads: send {CONTAINERS}")
        self._capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            raise InvalidVideoError(
                "the video could not be opened: it is truncated or damaged, or it has no video track"
            )
        fps = float(self._capture.get(cv2.CAP_PROP_FPS))
        self.info = VideoInfo(
            fps=fps if math.isfinite(fps) and 0 < fps <= MAX_SOURCE_FPS else 0.0,
            frame_count=max(0, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))),
            width=int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self.max_side = max_side
        # Reads and the release take turns: a capture released under a running read crashes OpenCV.
        self._lock = threading.Lock()

    def next_sample(self, samples: Iterator[SampledFrame]) -> SampledFrame | None:
        """The next of `samples` (from `samples()`), or None at the end; safe beside `close` on another thread."""
        with self._lock:
            if not self._capture.isOpened():
                return None
            return next(samples, None)

    def close(self) -> None:
        with self._lock:
            self._capture.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_size(self, max_seconds: float, max_pixels: int) -> None:
        """Refuse a video whose header says it is longer than `max_seconds`, or has more than `max_pixels` to decode."""
        duration = self.info.duration_s
        if duration is not None and duration > max_seconds + 1e-6:
            raise VideoTooLargeError(
                f"the video is {duration:.1f} s long, over the limit of {max_seconds:g} s: send a shorter clip"
            )
        # Only with a believed frame rate: without one (WebM often), OpenCV's frame count is the
        # duration times a made-up rate, and the count while reading decides instead.
        pixels = self.info.width * self.info.height * self.info.frame_count
        if self.info.fps > 0 and pixels > max_pixels:
            raise VideoTooLargeError(_too_many_pixels(self.info.width, self.info.height, max_pixels))

    def samples(self, fps: float, max_seconds: float, max_pixels: int) -> Iterator[SampledFrame]:
        """The frames at `fps` per second of video (the first frame, then one each 1/fps s), in order.

        Raises `VideoTooLargeError` on reaching a frame past `max_seconds`, or past `max_pixels`
        decoded (for files whose header did not say, or said too little), and after more frames
        than `max_seconds` can hold at `MAX_SOURCE_FPS`.
        """
        step = 1.0 / fps
        next_t = 0.0
        index = -1
        decoded = 0
        frame_pixels = self.info.width * self.info.height  # the largest frame seen, once one is retrieved
        max_frames = int(max_seconds * MAX_SOURCE_FPS) + 1
        while True:
            if not self._capture.grab():
                return
            index += 1
            t = self._frame_time(index)
            if t > max_seconds + 1e-6 or index >= max_frames:
                raise VideoTooLargeError(
                    f"the video is longer than the limit of {max_seconds:g} s: send a shorter clip"
                )
            decoded += frame_pixels
            if decoded > max_pixels:
                raise VideoTooLargeError(_too_many_pixels(self.info.width, self.info.height, max_pixels))
            if t + 1e-6 < next_t:
                continue
            ok, bgr = self._capture.retrieve()
            if not ok or bgr is None:
                raise InvalidVideoError(f"frame {index} of the video could not be decoded: it is damaged")
            frame_pixels = max(frame_pixels, bgr.shape[0] * bgr.shape[1])
            next_t = max(next_t + step, t + step / 2)  # a long gap in the file does not make a burst of samples
            yield self._scaled(t, index, bgr)

    def _frame_time(self, index: int) -> float:
        """The grabbed frame's own timestamp (variable frame rates too), else its index over the header's fps."""
        stamp = float(self._capture.get(cv2.CAP_PROP_POS_MSEC))
        if math.isfinite(stamp) and stamp > 0:
            return stamp / 1000.0
        return index / self.info.fps if self.info.fps > 0 else 0.0

    def _scaled(self, t: float, index: int, bgr: np.ndarray) -> SampledFrame:
        height, width = bgr.shape[:2]
        scale = max(1.0, max(height, width) / self.max_side)
        if scale > 1.0:
            size = (max(1, round(width / scale)), max(1, round(height / scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        return SampledFrame(t, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), scale, (width, height))


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


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return (
        f"the video has more than {max_pixels:,} pixels to decode ({width}x{height} frames): "
        "send a shorter clip, or one of fewer pixels or frames per second"
    )
