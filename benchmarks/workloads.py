"""The images the benchmarks send: a 48×48 JPEG face and a 640×480 photo with a face in it."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

ASTRONAUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut.jpg"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def face_jpeg_48() -> bytes:
    """The astronaut's face cropped and shrunk to a FER-sized 48×48 grayscale JPEG."""
    return _jpeg(Image.open(ASTRONAUT).convert("L").crop((174, 64, 275, 165)).resize((48, 48)))


def photo_jpeg_640() -> bytes:
    """The astronaut photo placed in a 640×480 frame: one face, detected by the Haar cascade."""
    scene = Image.new("RGB", (640, 480), (120, 130, 140))
    scene.paste(Image.open(ASTRONAUT).convert("RGB").resize((400, 400)), (120, 40))
    return _jpeg(scene)
