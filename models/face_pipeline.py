"""The face pipeline: a decoded photo or video frame → the faces ready for the network.

One path for photos, batch items and video frames: detect (on a copy at most `detect_max_side`)
→ filter by size and cap → frame and cut → preprocess, with one grayscale conversion (Pillow's,
as training's) and one face-crop rule (`is_face_crop_size`). Side-effect free: no threads, no
queue, no I/O; the engine decides where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.config import EngineConfig
from models.decoding import DecodedPhoto, is_face_crop_size
from models.errors import NoFaceError
from models.faces import DetectedFace, FaceDetector, detect_faces, frame_face
from models.preprocessing import PreprocessingSpec, preprocess, to_grayscale, to_rgb


@dataclass(frozen=True)
class Face:
    """One face ready for the network: (1, 48, 48) float32, and what the detector said (None: the whole image).

    The detection is in the pixels of the upload or video frame, after EXIF orientation.
    """

    inputs: np.ndarray
    detected: DetectedFace | None


@dataclass(frozen=True)
class FacePolicy:
    """Which detected faces are classified."""

    all_faces: bool  # every face up to max_faces, or the largest only
    max_faces: int
    min_face_px: float  # in the upload's (or frame's) pixels
    detect_max_side: int

    @classmethod
    def of(cls, config: EngineConfig, *, all_faces: bool) -> FacePolicy:
        """The policy the engine's configuration asks for."""
        return cls(all_faces, config.max_faces, config.min_face_px, config.detect_max_side)


@dataclass(frozen=True)
class FaceSearch:
    """How many faces the detector found, and how many were left out and why."""

    found: int
    too_small: int
    dropped: int  # usable faces beyond max_faces
    classified: int

    @property
    def no_face_reason(self) -> str | None:
        """Why no face was classified: "none_found" or "too_small"; None when some were."""
        if self.classified:
            return None
        return "too_small" if self.too_small else "none_found"


@dataclass(frozen=True)
class PreparedImage:
    """An upload's (or frame's) faces ready for the network, largest first, and what the search found."""

    faces: tuple[Face, ...]
    search: FaceSearch | None  # None: a face crop, not searched


def search_faces(
    image: Image.Image,
    scale: float,
    full_size: tuple[int, int],
    detector: FaceDetector,
    policy: FacePolicy,
    spec: PreprocessingSpec,
) -> tuple[tuple[Face, ...], FaceSearch, Image.Image]:
    """Detect, filter, cap, frame and preprocess the faces of an image decoded `scale` times smaller.

    Returns the faces (detections in the full image's pixels), the search's counts and the
    grayscale image (for the whole-image fallback).
    """
    gray = to_grayscale(image)
    found = detect_faces(detector, np.asarray(to_rgb(image)), policy.detect_max_side)
    usable = [face for face in found if face.box.side >= policy.min_face_px / scale]
    kept = usable[: policy.max_faces if policy.all_faces else 1]
    gray_pixels = np.asarray(gray)
    width, height = full_size
    faces = tuple(
        Face(
            preprocess(frame_face(gray_pixels, face, detector.framing), spec),
            face.scaled(scale, width, height) if scale != 1.0 else face,
        )
        for face in kept
    )
    search = FaceSearch(
        found=len(found),
        too_small=len(found) - len(usable),
        dropped=max(0, len(usable) - policy.max_faces),
        classified=len(faces),
    )
    return faces, search, gray


def prepare_photo(
    photo: DecodedPhoto, detector: FaceDetector, policy: FacePolicy, spec: PreprocessingSpec, *, require_face: bool
) -> PreparedImage:
    """A decoded upload → one input per face; the whole image when none is usable (or it is a face crop).

    Raises:
        NoFaceError: `require_face` and no usable face was found.
    """
    if is_face_crop_size(*photo.full_size):  # by the upload's size, not the reduced decode's
        return PreparedImage((Face(preprocess(photo.image, spec), None),), None)
    faces, search, gray = search_faces(photo.image, photo.scale, photo.full_size, detector, policy, spec)
    if faces:
        return PreparedImage(faces, search)
    if require_face:
        if search.too_small:
            raise NoFaceError(
                f"the {search.too_small} face(s) found are smaller than {policy.min_face_px:g} px: send a photo "
                "where the face is larger, or drop require_face"
            )
        raise NoFaceError("no face was found in the image: send a photo with a visible face, or drop require_face")
    return PreparedImage((Face(preprocess(gray, spec), None),), search)


def prepare_frame(
    rgb: np.ndarray, scale: float, size: tuple[int, int], detector: FaceDetector, policy: FacePolicy,
    spec: PreprocessingSpec,
) -> tuple[Face, ...]:  # fmt: skip
    """A video frame's faces (RGB pixels `scale` times smaller than the frame's `size`), boxes in the frame's pixels."""
    faces, _, _ = search_faces(Image.fromarray(rgb, mode="RGB"), scale, size, detector, policy, spec)
    return faces
