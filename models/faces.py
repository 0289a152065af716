"""Finding faces in a photo and cutting them the way FER2013 frames its faces.

A detector is anything with `detect(bgr) -> list[DetectedFace]` (a box, a score and, where the
detector gives them, five landmarks); `models/yunet.py` is the default and `models/haar.py` the
2001-era cascade kept for comparison. `detect_faces` runs one on a copy downscaled to
`detect_max_side` and maps the boxes back to the image's pixels; `frame_face` cuts a face the
way the detector's boxes ask. `models/face_pipeline.py` puts them together.

Framing (docs/framing.md has the measurements): on FER2013 val faces pasted into larger scenes,
the true FER crop is best predicted by YuNet's box (side 0.97× the box, centred on it; the
landmarks predict it less well), and a square 0.90× the box, moved up by 5% of its side, gave
the best accuracy on kdef-dev's half profiles and on the pasted faces (as good as their original
crops) while meeting the frontal target. Levelling the eyes cost accuracy on both (FER2013's
faces are not levelled either), so it is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

Point = tuple[float, float]


@dataclass(frozen=True)
class FaceBox:
    """A face in image pixels: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def from_float(
        cls, x: float, y: float, width: float, height: float, image_width: int, image_height: int
    ) -> FaceBox:
        """Round a detector's box and clip it to the image."""
        left, top = max(0, round(x)), max(0, round(y))
        right, bottom = min(image_width, round(x + width)), min(image_height, round(y + height))
        return cls(left, top, max(1, right - left), max(1, bottom - top))

    @property
    def area(self) -> int:
        """Pixels covered by the box."""
        return self.width * self.height

    @property
    def side(self) -> int:
        """The shorter side: what the minimum face size is compared with."""
        return min(self.width, self.height)

    def as_list(self) -> list[int]:
        """[x, y, w, h] for JSON."""
        return [self.x, self.y, self.width, self.height]


@dataclass(frozen=True)
class DetectedFace:
    """What a detector reports for one face: its box, its score (0-1) and its landmarks.

    Landmarks, in image pixels: right eye, left eye (the person's), nose tip, right and left
    mouth corners, as YuNet orders them; None for a detector that gives none.
    """

    box: FaceBox
    score: float
    landmarks: tuple[Point, Point, Point, Point, Point] | tuple[Point, ...] | None = None

    def scaled(self, factor: float, image_width: int, image_height: int) -> DetectedFace:
        """The same face in an image `factor` times larger."""
        box = self.box
        scaled_box = FaceBox.from_float(
            box.x * factor, box.y * factor, box.width * factor, box.height * factor, image_width, image_height
        )
        points = tuple((x * factor, y * factor) for x, y in self.landmarks) if self.landmarks else None
        return DetectedFace(scaled_box, self.score, points)


@dataclass(frozen=True)
class Framing:
    """How a detected face is cut: the crop's side and centre, and whether the eyes are levelled."""

    # "box": side = scale × the box's longer side, centred on the box;
    # "landmarks": side = scale × the eyes-to-mouth distance, centred on the landmarks' mean.
    reference: str = "box"
    scale: float = 0.9
    centre_shift: float = -0.05  # the centre moved down by this fraction of the side (up, when negative)
    level_eyes: bool = False


DEFAULT_FRAMING = Framing()


class FaceDetector(Protocol):
    """What the engine needs of a detector: its name, how its faces are cut, and the search."""

    name: str
    framing: Framing

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 BGR image, in its pixel coordinates."""
        ...


def crop_geometry(face: DetectedFace, framing: Framing) -> tuple[Point, float, float]:
    """The crop's centre (x, y), its side and its rotation in degrees (counter-clockwise)."""
    box = face.box
    landmarks = face.landmarks if face.landmarks and len(face.landmarks) >= 5 else None
    if framing.reference == "landmarks" and landmarks:
        right_eye, left_eye, _nose, mouth_right, mouth_left = landmarks[:5]
        eyes = ((right_eye[0] + left_eye[0]) / 2, (right_eye[1] + left_eye[1]) / 2)
        mouth = ((mouth_right[0] + mouth_left[0]) / 2, (mouth_right[1] + mouth_left[1]) / 2)
        side = framing.scale * max(1.0, math.dist(eyes, mouth))
        cx, cy = sum(x for x, _ in landmarks[:5]) / 5, sum(y for _, y in landmarks[:5]) / 5
    else:
        side = framing.scale * max(box.width, box.height)
        cx, cy = box.x + box.width / 2, box.y + box.height / 2
    angle = 0.0
    if framing.level_eyes and landmarks:
        # The person's right eye is on the image's left: the line from it to the left eye is
        # level when its angle is zero.
        (rx, ry), (lx, ly) = landmarks[0], landmarks[1]
        angle = math.degrees(math.atan2(ly - ry, lx - rx))
    return (cx, cy + framing.centre_shift * side), side, angle


def frame_face(gray: np.ndarray, face: DetectedFace, framing: Framing = DEFAULT_FRAMING) -> Image.Image:
    """The face cut from an (H, W) uint8 image as a square at its own resolution, eyes levelled if asked.

    Beyond the image's edge the border pixels are repeated, as FER2013's crops of faces near an
    edge are not black.
    """
    (cx, cy), side, angle = crop_geometry(face, framing)
    size = max(1, round(side))
    # Output pixel (x, y) samples the image at centre + R·((x, y) − size/2): R turns by `angle`
    # (counter-clockwise in the image, as OpenCV's getRotationMatrix2D does) about the crop's centre.
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    a, b, d, e = cos, -sin, sin, cos
    c, f = cx - a * size / 2 - b * size / 2, cy - d * size / 2 - e * size / 2
    # The part of the image the crop reads, a pixel wider than its corners, with the border pixels
    # repeated past the image's edge: Pillow's transform would fill there with black.
    corners = [(a * x + b * y + c, d * x + e * y + f) for x in (0, size) for y in (0, size)]
    left = math.floor(min(x for x, _ in corners)) - 2
    top = math.floor(min(y for _, y in corners)) - 2
    right = math.ceil(max(x for x, _ in corners)) + 3
    bottom = math.ceil(max(y for _, y in corners)) + 3
    height, width = gray.shape
    y0, x0 = min(max(top, 0), height - 1), min(max(left, 0), width - 1)
    y1, x1 = max(min(bottom, height), y0 + 1), max(min(right, width), x0 + 1)
    above, before = max(0, y0 - top), max(0, x0 - left)
    region = np.pad(gray[y0:y1, x0:x1], ((above, max(0, bottom - y1)), (before, max(0, right - x1))), mode="edge")
    # Pillow samples output pixel centres (x + 0.5) and reads input pixel centres: move its origin
    # so that output pixel x reads the region at a·x + b·y + c, as the geometry above says.
    c_region, f_region = c - (x0 - before), f - (y0 - above)
    data = (a, b, c_region + 0.5 - 0.5 * (a + b), d, e, f_region + 0.5 - 0.5 * (d + e))
    source = Image.fromarray(np.ascontiguousarray(region), mode="L")
    return source.transform((size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


def detect_faces(detector: FaceDetector, rgb: np.ndarray, detect_max_side: int) -> list[DetectedFace]:
    """Faces in an (H, W, 3) RGB image, found on a copy no larger than `detect_max_side`, largest first."""
    height, width = rgb.shape[:2]
    scale = min(1.0, detect_max_side / max(width, height))
    small = rgb
    if scale < 1.0:
        # An area average (Pillow's box filter, OpenCV's INTER_AREA), so no aliasing: a bilinear
        # shrink gave a false face on tests/data/astronaut.jpg.
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    found = detector.detect(np.ascontiguousarray(small[..., ::-1]))  # RGB → BGR, as OpenCV's models expect
    faces = [face.scaled(1 / scale, width, height) for face in found] if scale < 1.0 else found
    return sorted(faces, key=lambda face: face.box.area, reverse=True)
