"""The face detectors the engine can use, by name: the one place a new detector is registered."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from models.faces import FaceDetector

DetectorName = Literal["yunet", "haar"]


def build_detector(name: DetectorName, model_file: Path | None = None, *, threads: int = 1) -> FaceDetector:
    """The detector called `name`, its model file (default: the shipped one) checked; `threads` within one search.

    Raises:
        DetectorError: one line saying what is wrong with the model file or the detector.
    """
    if name == "yunet":
        from models.yunet import MODEL_FILE, YuNetDetector

        return YuNetDetector(model_file or MODEL_FILE, threads=threads)
    if name == "haar":
        from models.haar import HaarDetector

        return HaarDetector()
    raise ValueError(f"unknown face detector {name!r}")
