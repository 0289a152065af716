"""Faces across video frames: a box-overlap tracker, smoothing over time, and a summary per track.

The tracker is greedy intersection-over-union matching, frame to frame:
- Each face in a new frame joins the live track whose last box it overlaps most (IoU at least
  `min_iou`). Pairs are taken best first, so two faces never share a track.
- A face that overlaps no live track starts a new one.
- A track not matched for more than `max_gap_s` seconds ends. A person who leaves the frame and
  comes back after that gets a new id; back sooner and at the same place, the old id.
- When two people cross, their boxes overlap and the ids can swap: the tracker knows boxes, not
  faces.

Smoothing is an exponential average over time with time constant `smooth_s` (seconds), so it does
not depend on the sampling rate: a sample `dt` seconds after the last one moves the average by
`1 - exp(-dt / smooth_s)` of the way. `smooth_s=0` leaves the probabilities as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.faces import FaceBox

MIN_IOU = 0.3
MAX_GAP_S = 1.0


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes (0 when they do not touch)."""
    left, top = max(a.x, b.x), max(a.y, b.y)
    right, bottom = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    inter = max(0, right - left) * max(0, bottom - top)
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


@dataclass
class TrackPoint:
    """One face of one track in one analysed frame."""

    t: float
    frame: int
    box: FaceBox
    probabilities: np.ndarray  # in class order
    smoothed: np.ndarray


@dataclass
class Track:
    """One face followed through the video."""

    id: int
    points: list[TrackPoint] = field(default_factory=list)

    @property
    def first_s(self) -> float:
        return self.points[0].t

    @property
    def last_s(self) -> float:
        return self.points[-1].t


class Tracker:
    """Assigns each frame's faces to tracks and smooths each track's probabilities."""

    def __init__(self, *, smooth_s: float, min_iou: float = MIN_IOU, max_gap_s: float = MAX_GAP_S) -> None:
        if smooth_s < 0:
            raise ValueError(f"smooth_s must be 0 or more, not {smooth_s}")
        self.smooth_s = smooth_s
        self.min_iou = min_iou
        self.max_gap_s = max_gap_s
        self.tracks: list[Track] = []
        self._live: list[Track] = []

    def update(self, t: float, frame: int, faces: Sequence[tuple[FaceBox, np.ndarray]]) -> list[int]:
        """Add one frame's faces (box, probabilities); returns each face's track id, in their order."""
        self._live = [track for track in self._live if t - track.last_s <= self.max_gap_s]
        pairs = sorted(
            (
                (iou(track.points[-1].box, box), track_index, face_index)
                for track_index, track in enumerate(self._live)
                for face_index, (box, _) in enumerate(faces)
            ),
            reverse=True,
        )
        chosen: dict[int, Track] = {}
        taken: set[int] = set()
        for overlap, track_index, face_index in pairs:
            if overlap < self.min_iou:
                break
            if track_index in taken or face_index in chosen:
                continue
            taken.add(track_index)
            chosen[face_index] = self._live[track_index]
        ids = []
        for face_index, (box, probabilities) in enumerate(faces):
            track = chosen.get(face_index)
            if track is None:
                track = Track(id=len(self.tracks) + 1)
                self.tracks.append(track)
                self._live.append(track)
            previous = track.points[-1] if track.points else None
            smoothed = self._smooth(previous, t, probabilities)
            track.points.append(TrackPoint(t, frame, box, probabilities, smoothed))
            ids.append(track.id)
        return ids

    def _smooth(self, previous: TrackPoint | None, t: float, probabilities: np.ndarray) -> np.ndarray:
        if previous is None or self.smooth_s == 0:
            return probabilities.copy()
        weight = 1.0 - math.exp(-max(t - previous.t, 0.0) / self.smooth_s)
        return np.asarray(previous.smoothed + weight * (probabilities - previous.smoothed))


@dataclass(frozen=True)
class TrackSummary:
    """A track at a glance: how long it was in view, its mean probabilities, its dominant emotion."""

    duration_s: float
    mean_probabilities: dict[str, float]
    dominant: str
    frames: int


def summarise(track: Track, classes: Sequence[str], frame_interval_s: float, end_s: float) -> TrackSummary:
    """Duration in view (first to last sample plus one sampling interval, within the video's `end_s`),
    mean raw probabilities, their argmax."""
    mean = np.mean([point.probabilities for point in track.points], axis=0)
    return TrackSummary(
        duration_s=min(track.last_s + frame_interval_s, max(end_s, track.last_s)) - track.first_s,
        mean_probabilities={name: float(p) for name, p in zip(classes, mean, strict=True)},
        dominant=classes[int(mean.argmax())],
        frames=len(track.points),
    )
