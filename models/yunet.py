"""YuNet, the default face detector: the model file shipped here, run by ONNX Runtime, decoded in numpy.

YuNet (Wu, Peng & Yu, Machine Intelligence Research 2023) is the face detector of OpenCV's model
zoo: a 230 KB ONNX network that gives each face a box, five landmarks (eyes, nose tip, mouth
corners) and a score. The file `face_detection_yunet_2026may.onnx` ships beside this module under
the MIT licence (`face_detection_yunet.LICENSE`); its SHA-256 is checked when the detector is
built, so a missing or damaged file stops start-up with one line instead of failing on the first
photo.

The network runs in ONNX Runtime, the runtime that already serves the classifier, and its
outputs are decoded here the way OpenCV's `FaceDetectorYN` (4.8+) decodes them, so the service
needs no OpenCV: the image is padded at its right and bottom to a multiple of 32, fed as BGR
floats in 0-255, and each of the three strides (8, 16, 32) gives, per cell, a class and an
objectness score (their geometric mean is the face's score), a box as the cell's offset and
log-size, and five landmarks as offsets. Faces above the score threshold go through greedy
non-maximum suppression on OpenCV's integer boxes, best first. `tests/test_faces.py` checks it
against `cv2.FaceDetectorYN` where OpenCV is installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models.errors import DetectorError
from models.faces import DEFAULT_FRAMING, DetectedFace, FaceBox
from models.onnx_network import quiet_session_options

MODEL_FILE = Path(__file__).resolve().parent / "face_detection_yunet_2026may.onnx"
MODEL_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
# The zoo's defaults: a face is kept above score 0.9 and boxes overlapping by IoU 0.3 are merged.
SCORE_THRESHOLD = 0.9
NMS_THRESHOLD = 0.3
TOP_K = 5000
STRIDES = (8, 16, 32)
PAD_TO = 32  # the largest stride: every stride's grid then covers the padded image exactly


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
    """Faces with landmarks in a BGR image; one ONNX Runtime session, shared by every thread that searches."""

    name = "yunet"
    framing = DEFAULT_FRAMING  # measured for YuNet's boxes (docs/framing.md)

    def __init__(
        self, model_path: Path = MODEL_FILE, score_threshold: float = SCORE_THRESHOLD, threads: int = 1
    ) -> None:
        """`threads`: ONNX Runtime's threads inside one search (photos are already searched on several at once)."""
        import onnxruntime as ort

        model = check_model_file(model_path)
        self.score_threshold = score_threshold
        try:
            # ONNX Runtime's sessions may run from several threads at once.
            self._session = ort.InferenceSession(
                model, quiet_session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own pybind exception types for every kind of bad file
            first = str(exc).replace("\n", " ")[:200]
            raise DetectorError(f"face detector model {model_path}: ONNX Runtime cannot load it ({first})") from None
        self._input = self._session.get_inputs()[0].name
        names = [output.name for output in self._session.get_outputs()]
        wanted = [f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in STRIDES]
        if sorted(names) != sorted(wanted):
            raise DetectorError(f"face detector model {model_path}: outputs {names} are not YuNet's {wanted}")
        self._outputs = wanted

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 BGR image, in its pixel coordinates, best score first."""
        height, width = bgr.shape[:2]
        padded_h, padded_w = -(-height // PAD_TO) * PAD_TO, -(-width // PAD_TO) * PAD_TO
        blob = np.zeros((1, 3, padded_h, padded_w), np.float32)
        blob[0, :, :height, :width] = bgr.transpose(2, 0, 1)
        outputs = dict(zip(self._outputs, self._session.run(self._outputs, {self._input: blob}), strict=True))
        rows = np.concatenate([decode_stride(outputs, stride, padded_w, padded_h) for stride in STRIDES])
        kept = non_maximum_suppression(rows, self.score_threshold, NMS_THRESHOLD, TOP_K)
        faces = []
        for row in rows[kept]:
            x, y, w, h = (float(v) for v in row[:4])
            landmarks = tuple((float(row[4 + 2 * i]), float(row[5 + 2 * i])) for i in range(5))
            faces.append(DetectedFace(FaceBox.from_float(x, y, w, h, width, height), float(row[14]), landmarks))
        return faces


def decode_stride(outputs: dict[str, np.ndarray], stride: int, padded_w: int, padded_h: int) -> np.ndarray:
    """One stride's cells as rows of (x, y, w, h, 5 × landmark x, y, score), in the padded image's pixels."""
    cols, rows = padded_w // stride, padded_h // stride
    cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
    obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
    bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)
    kps = outputs[f"kps_{stride}"].reshape(-1, 10)
    row_index, col_index = np.divmod(np.arange(rows * cols, dtype=np.float32), np.float32(cols))
    # float32 throughout, as OpenCV computes it, so that boxes truncate to the same integers.
    s = np.float32(stride)
    cx, cy = (col_index + bbox[:, 0]) * s, (row_index + bbox[:, 1]) * s
    w, h = np.exp(bbox[:, 2]) * s, np.exp(bbox[:, 3]) * s
    points = np.empty((len(cls), 10), np.float32)
    points[:, 0::2] = (kps[:, 0::2] + col_index[:, None]) * s
    points[:, 1::2] = (kps[:, 1::2] + row_index[:, None]) * s
    score = np.sqrt(cls * obj)
    return np.column_stack([cx - w / 2, cy - h / 2, w, h, points, score]).astype(np.float32)


def non_maximum_suppression(rows: np.ndarray, score_threshold: float, iou_threshold: float, top_k: int) -> list[int]:
    """Indices of the faces kept, best first: OpenCV's `dnn::NMSBoxes` on integer boxes, as FaceDetectorYN calls it."""
    scores = rows[:, 14]
    candidates = np.flatnonzero(scores > score_threshold)
    # Best first; among equal scores the earlier cell first, as OpenCV's stable sort leaves them.
    order = candidates[np.argsort(-scores[candidates], kind="stable")][:top_k]
    boxes = rows[order, :4].astype(np.int32).astype(np.int64)  # OpenCV's Rect2i(int(x), int(y), int(w), int(h))
    left, top = boxes[:, 0], boxes[:, 1]
    right, bottom = left + boxes[:, 2], top + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    kept: list[int] = []
    for i in range(len(order)):
        if kept:
            k = np.array(kept)
            overlap_w = np.clip(np.minimum(right[i], right[k]) - np.maximum(left[i], left[k]), 0, None)
            overlap_h = np.clip(np.minimum(bottom[i], bottom[k]) - np.maximum(top[i], top[k]), 0, None)
            overlap = overlap_w * overlap_h
            union = area[i] + area[k] - overlap
            iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
            if (iou > iou_threshold).any():
                continue
        kept.append(i)
    return [int(order[i]) for i in kept]
