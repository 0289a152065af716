"""OpenCV's Haar cascade (2001), kept as an option to compare the default detector against.

It ships inside the opencv-python-headless 4.x wheels, which the `haar` extra installs (the
service itself needs no OpenCV); without them, or with OpenCV 5 (which removed
`CascadeClassifier`), `FER_DETECTOR=haar` stops start-up with a one-line reason. It gives no
landmarks, so its faces are framed from the box alone, with the margin measured for it when it
was the default.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DetectorError
from models.faces import DetectedFace, FaceBox, Framing

DEFAULT_CASCADE = "haarcascade_frontalface_alt2.xml"


class HaarDetector:
    """OpenCV's Haar cascade; one classifier per thread (OpenCV's are not shared safely)."""

    name = "haar"
    # The Haar box is 1/1.04 of a FER crop's side (measured when it was the default): a 2% margin a side.
    framing = Framing("box", scale=1.04, centre_shift=0.0)

    def __init__(self, cascade: str = DEFAULT_CASCADE, min_neighbors: int = 5) -> None:
        try:
            import cv2
        except ImportError:
            raise DetectorError(
                "the Haar detector needs OpenCV 4.x: pip install 'fer-service[haar]', or use FER_DETECTOR=yunet"
            ) from None
        self._cv2 = cv2
        if not hasattr(cv2, "CascadeClassifier"):
            raise DetectorError(
                f"the Haar detector needs OpenCV 4.x (CascadeClassifier), and this is OpenCV {cv2.__version__}: "
                "use FER_DETECTOR=yunet"
            )
        self.cascade_path = Path(cv2.data.haarcascades) / cascade  # type: ignore[attr-defined]
        if not self.cascade_path.is_file() or cv2.CascadeClassifier(str(self.cascade_path)).empty():
            raise DetectorError(f"{self.cascade_path}: the Haar cascade is missing from the OpenCV wheel")
        self.min_neighbors = min_neighbors
        self._local = threading.local()

    def _classifier(self) -> Any:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = self._cv2.CascadeClassifier(str(self.cascade_path))
            self._local.classifier = classifier
        return classifier

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 BGR image; the score is 1 (the cascade gives none)."""
        gray = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2GRAY)
        height, width = gray.shape
        found = self._classifier().detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(24, 24)
        )
        return [
            DetectedFace(FaceBox.from_float(x, y, w, h, width, height), 1.0)
            for (x, y, w, h) in (found if len(found) else [])
        ]
