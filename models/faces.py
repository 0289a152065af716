"""Face detection: find faces in a photo and cut them out for the network.

An image whose shorter side is at most `FACE_CROP_MAX_SIDE` pixels is taken as a face crop
already (FER2013 faces are 48×48). A larger photo goes through OpenCV's Haar cascade, which
ships inside the opencv-python-headless wheel, so nothing is downloaded. Detection costs far
more than the network, so it runs on a copy downscaled to `detect_max_side`, and the face is
cropped from the full-resolution image.

Measured on 200 FER2013 val faces pasted at 160 px into a flat 640×480 scene, detecting on a
half-size INTER_AREA copy (/tmp/tune.py probe; figures in docs/SERVICE.md): frontalface_alt2
found 78% with 2 false boxes at 10.9 ms a photo, frontalface_default 77.5% with 3 at 13.4 ms,
so alt2 it is. Histogram equalisation cost 23 points of detection rate and was dropped. The
Haar box is 1/1.04 of the FER crop's side, so a 2% margin per side gives the network the
framing it was trained on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from models.preprocessing import to_grayscale

FACE_CROP_MAX_SIDE = 64
DEFAULT_CASCADE = "haarcascade_frontalface_alt2.xml"


@dataclass(frozen=True)
class FaceBox:
    """A face in image pixels: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        """Pixels covered by the box."""
        return self.width * self.height

    def as_list(self) -> list[int]:
        """[x, y, w, h] for JSON."""
        return [self.x, self.y, self.width, self.height]


@dataclass(frozen=True)
class Face:
    """A face to classify: its grayscale pixels and where it was found (None: the whole image)."""

    image: Image.Image
    box: FaceBox | None


def is_face_crop(image: Image.Image) -> bool:
    """True when the image is small enough to be a face crop rather than a photo."""
    return min(image.size) <= FACE_CROP_MAX_SIDE


class FaceDetector:
    """OpenCV Haar cascade on a downscaled copy; one classifier per thread (OpenCV's are not shared safely)."""

    def __init__(
        self,
        cascade: str = DEFAULT_CASCADE,
        detect_max_side: int = 320,
        margin: float = 0.02,
        min_neighbors: int = 5,
    ) -> None:
        self.cascade_path = Path(cv2.data.haarcascades) / cascade  # type: ignore[attr-defined]
        if not self.cascade_path.is_file() or cv2.CascadeClassifier(str(self.cascade_path)).empty():
            raise FileNotFoundError(f"{self.cascade_path}: the Haar cascade is missing from the OpenCV wheel")
        self.detect_max_side = detect_max_side
        self.margin = margin
        self.min_neighbors = min_neighbors
        self._local = threading.local()

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = cv2.CascadeClassifier(str(self.cascade_path))
            self._local.classifier = classifier
        return classifier

    def detect(self, gray: Image.Image) -> list[FaceBox]:
        """Faces in an 8-bit grayscale image, in its own pixel coordinates, largest first."""
        width, height = gray.size
        scale = min(1.0, self.detect_max_side / max(width, height))
        pixels: np.ndarray = np.asarray(gray, dtype=np.uint8)
        if scale < 1.0:
            # INTER_AREA averages, so no aliasing: a bilinear shrink gave a false face on tests/data/astronaut.jpg.
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        found = self._classifier().detectMultiScale(
            pixels, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(24, 24)
        )
        boxes = [
            FaceBox(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for (x, y, w, h) in (found if len(found) else [])
        ]
        return sorted(boxes, key=lambda box: box.area, reverse=True)

    def crop(self, gray: Image.Image, box: FaceBox) -> Image.Image:
        """A square crop around the box grown by `margin` on each side, kept inside the image."""
        side = round(max(box.width, box.height) * (1 + 2 * self.margin))
        side = min(side, gray.width, gray.height)
        cx, cy = box.x + box.width / 2, box.y + box.height / 2
        left = int(min(max(0, round(cx - side / 2)), gray.width - side))
        top = int(min(max(0, round(cy - side / 2)), gray.height - side))
        return gray.crop((left, top, left + side, top + side))

    def find_faces(self, image: Image.Image, all_faces: bool = False) -> list[Face]:
        """The faces to classify: the largest (or every) detected face, [] when none is found.

        A face crop (shorter side ≤ 64 px) is returned whole with box None, undetected.
        """
        gray = to_grayscale(image)
        if is_face_crop(gray):
            return [Face(image=gray, box=None)]
        boxes = self.detect(gray)
        if not all_faces:
            boxes = boxes[:1]
        return [Face(image=self.crop(gray, box), box=box) for box in boxes]
