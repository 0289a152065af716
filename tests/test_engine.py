"""Which uploads the service prepares inline on the event loop, and which it hands to a thread."""

from __future__ import annotations

from PIL import Image

from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from models.engine import QUICK_MAX_BYTES, is_quick
from tests.conftest import make_face
from tests.images import encode


def test_small_face_crops_are_prepared_inline() -> None:
    assert is_quick(face_jpeg_48())
    assert is_quick(encode(make_face(3, size=64)))


def test_photos_go_to_a_worker_thread() -> None:
    assert not is_quick(photo_jpeg_640())  # face detection: tens of ms
    assert not is_quick(encode(make_face(3, size=100)))  # shorter side over 64: detection runs


def test_a_small_file_claiming_many_pixels_goes_to_a_worker_thread() -> None:
    data = encode(Image.new("1", (3000, 3000)))  # a few KB that decode to 9 megapixels
    assert len(data) < QUICK_MAX_BYTES
    assert not is_quick(data)


def test_undecodable_and_oversized_bytes_are_not_quick() -> None:
    assert not is_quick(b"not an image at all")
    assert not is_quick(b"")
    assert not is_quick(face_jpeg_48() + b"\0" * QUICK_MAX_BYTES)
