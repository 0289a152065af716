"""Domain errors raised by the inference core.

The tree::

    FerError
    ├── InvalidImageError       the bytes are not a decodable image (empty, truncated, junk)
    ├── UnsupportedImageError   a real file, but not an image type we accept (SVG, PDF, animated)
    ├── ImageTooLargeError      over the byte or pixel limit (decompression bombs included)
    ├── NoFaceError             a face was required and none was found
    ├── InvalidVideoError       a video container that cannot be decoded (truncated, damaged, no frames)
    ├── UnsupportedVideoError   bytes that are not a video container we read
    ├── VideoTooLargeError      a video over the length limit or the pixels-to-decode limit
    ├── NotMeasuredError        figures were asked for a TTA mode the checkpoint has none for
    ├── QueueFullError          over capacity: the batching queue has no room
    ├── CheckpointError         a checkpoint that is missing, corrupt or does not match the code
    └── DetectorError           a face detector that cannot be built (missing or damaged model file)

Each message says what was wrong and what the caller can do about it.
"""

from __future__ import annotations


class FerError(Exception):
    """Base class of every error the inference core raises on purpose."""


class InvalidImageError(FerError):
    """The data could not be decoded as an image."""


class UnsupportedImageError(FerError):
    """The data is a file of a type or shape the service does not accept."""


class ImageTooLargeError(FerError):
    """The image exceeds the configured byte or pixel limit."""


class NoFaceError(FerError):
    """A face was required and the detector found none."""


class InvalidVideoError(FerError):
    """The video could not be decoded: truncated, damaged, or without a readable frame."""


class UnsupportedVideoError(FerError):
    """The data is not a video file of a type the service reads."""


class VideoTooLargeError(FerError):
    """The video is longer, or has more pixels to decode, than the configured limits."""


class NotMeasuredError(FerError):
    """The checkpoint stores no evaluation figures for what was asked."""


class DecodeCancelledError(FerError):
    """A decode was stopped because the request it was for went away (nobody reads this answer)."""


class QueueFullError(FerError):
    """The batching queue is full: the service is over capacity for now."""

    @classmethod
    def videos_busy(cls, analysing: int) -> QueueFullError:
        """Every analysis slot is taken (`max_video_jobs`)."""
        return cls(f"the service is already analysing {analysing} videos: retry in a moment")


class CheckpointError(FerError):
    """A checkpoint file is missing, unreadable or does not match the code."""


class DetectorError(FerError):
    """A face detector's model file is missing or damaged, or the detector is not available here."""
