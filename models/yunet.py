"""YuNet, the default face detector: OpenCV's `FaceDetectorYN` running the model file shipped here.

YuNet (Wu, Peng & Yu, Machine Intelligence Research 2023) is the face detector of OpenCV's model
zoo: a 230 KB ONNX network that gives each face a box, five landmarks (eyes, nose tip, mouth
corners) and a score, and runs in OpenCV 4.5.4+ and 5.x alike. The file
`face_detection_yunet_2026may.onnx` ships beside this module under the MIT licence
(`face_detection_yunet.LICENSE`); its SHA-256 is checked when the detector is built, so a missing
or damaged file stops start-up with one line instead of failing on the first photo.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np

from models.errors import DetectorError
from models.faces import DEFAULT_FRAMING, DetectedFace, FaceBox

MODEL_FILE = Path(__file__).resolve().parent / "face_detection_yunet_2026may.onnx"
MODEL_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
# The zoo's defaults: a face is kept above score 0.9 and boxes overlapping by IoU 0.3 are merged.
SCORE_THRESHOLD = 0.9
NMS_THRESHOLD = 0.3
TOP_K = 5000


def check_model_file(path: Path = MODEL_FILE, sha256: str = MODEL_SHA256) -> bytes:
    """The model file's bytes, checked against its known hash; raises `DetectorError` with one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DetectorError(f"face detector model {path}: cannot be read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DetectorError(
            f"face detector model {path}: sha256 {digest[:12]}… is not the shipped file's {sha256[:12]}…; "
            "restore it from the repository"
        )
    return data


class YuNetDetector:
    """Faces with landmarks in a BGR image; one OpenCV detector per thread (they hold per-size state)."""

    name = "yunet"
    framing = DEFAULT_FRAMING  # measured for YuNet's boxes (docs/framing.md)

    def __init__(self, model_path: Path = MODEL_FILE, score_threshold: float = SCORE_THRESHOLD) -> None:
        # OpenCV 5 warns on stderr for every detector it builds (one per thread) that its new
        # graph engine ignores the preferred target; errors still get through.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        self._model = check_model_file(model_path)
        self.score_threshold = score_threshold
        self._local = threading.local()
        try:
            self._detector()  # a file with the right hash that OpenCV cannot load is still refused here
        except cv2.error as exc:
            raise DetectorError(f"face detector model {model_path}: OpenCV cannot load it ({exc.msg})") from None

    def _detector(self) -> cv2.FaceDetectorYN:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            buffer = np.frombuffer(self._model, dtype=np.uint8)
            detector = cv2.FaceDetectorYN.create(
                "onnx", buffer, np.empty(0, np.uint8), (320, 320), self.score_threshold, NMS_THRESHOLD, TOP_K
            )
            self._local.detector = detector
        return detector

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 BGR image, in its pixel coordinates, best score first."""
        height, width = bgr.shape[:2]
        detector = self._detector()
        detector.setInputSize((width, height))
        _, found = detector.detect(bgr)
        faces = []
        for row in found if found is not None else []:
            x, y, w, h = (float(v) for v in row[:4])
            landmarks = tuple((float(row[4 + 2 * i]), float(row[5 + 2 * i])) for i in range(5))
            faces.append(DetectedFace(FaceBox.from_float(x, y, w, h, width, height), float(row[14]), landmarks))
        return faces
