"""Image bytes for the tests, generated or from tests/data."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import make_face

DATA = Path(__file__).resolve().parent / "data"
ASTRONAUT = DATA / "astronaut.jpg"  # NASA portrait of Eileen Collins, public domain, as shipped by scikit-image
ASTRONAUT_FACE = (174, 64, 101, 101)  # the face box the detector finds in it


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def face_png(seed: int = 0) -> bytes:
    return encode(make_face(seed))


def face_jpeg(seed: int = 0) -> bytes:
    return encode(make_face(seed), "JPEG", quality=95)


def scene_with_face(left: int, top: int, side: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """The astronaut scaled so her face box is about `side` wide, pasted into a 640×480 grey scene.

    Returns the JPEG and where the face box should be found.
    """
    head = astronaut_head(side)
    scene = Image.new("RGB", (640, 480), (120, 130, 140))
    scene.paste(head, (left - side // 2, top - side // 2))
    return encode(scene, "JPEG", quality=92), (left, top, side, side)


def crowd_jpeg(positions: list[tuple[int, int]], side: int = 90) -> bytes:
    """The astronaut's head, `side` wide, at each (left, top) of a 640×480 grey scene: one face per position."""
    scene = Image.new("RGB", (640, 480), (120, 130, 140))
    for left, top in positions:
        one = Image.open(io.BytesIO(scene_with_face(left, top, side)[0]))
        box = (left - side // 2, top - side // 2, left + side + side // 2, top + side + side // 2)
        scene.paste(one.crop(box), box[:2])
    return encode(scene, "JPEG", quality=92)


def astronaut_head(side: int) -> Image.Image:
    """The astronaut's head (2 × `side` square) scaled so her face box is `side` wide."""
    photo = Image.open(ASTRONAUT).convert("RGB")
    scale = side / ASTRONAUT_FACE[2]
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
    fx, fy = round(ASTRONAUT_FACE[0] * scale), round(ASTRONAUT_FACE[1] * scale)
    return photo.crop((fx - side // 2, fy - side // 2, fx + side + side // 2, fy + side + side // 2))


def write_clip(
    path: Path,
    frames: list[list[tuple[int, int]]],
    *,
    fps: float = 10.0,
    side: int = 90,
    size: tuple[int, int] = (640, 480),
) -> Path:
    """An MP4 of grey frames with the astronaut's face box (`side` wide) at each frame's (left, top) positions."""
    import cv2

    head = cv2.cvtColor(np.asarray(astronaut_head(side)), cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    try:
        for positions in frames:
            frame = np.full((size[1], size[0], 3), (140, 130, 120), np.uint8)
            for left, top in positions:
                x, y = left - side // 2, top - side // 2
                frame[y : y + head.shape[0], x : x + head.shape[1]] = head
            writer.write(frame)
    finally:
        writer.release()
    return path


def write_y4m(path: Path, positions: list[tuple[int, int]], *, frames: int = 20, side: int = 120) -> Path:
    """A raw YUV4MPEG2 clip (what Chromium's fake camera plays) of the astronaut's face at `positions`."""
    import cv2

    head = cv2.cvtColor(np.asarray(astronaut_head(side)), cv2.COLOR_RGB2BGR)
    frame = np.full((480, 640, 3), (140, 130, 120), np.uint8)
    for left, top in positions:
        x, y = left - side // 2, top - side // 2
        frame[y : y + head.shape[0], x : x + head.shape[1]] = head
    planes = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes()
    with path.open("wb") as out:
        out.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            out.write(b"FRAME\n" + planes)
    return path


def _riff_chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def mjpeg_avi(frames: list[bytes], *, declared: tuple[int, int], fps: float) -> bytes:
    """An AVI of the given JPEG frames whose headers declare every frame `declared` (width, height).

    MJPEG frames are independent JPEGs, so the frames may be any size whatever the header says:
    how a hostile file makes a decoder do more than it declares.
    """
    width, height = declared
    rate = 1000
    avih = struct.pack("<14I", round(1e6 / fps), 0, 0, 0x10, len(frames), 0, 1, 0, width, height, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack(
        "<IHHIIIIIIIIhhhh", 0, 0, 0, 0, rate, round(fps * rate), 0, len(frames), 0, 0xFFFFFFFF, 0, 0, 0, width, height
    )
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    stream = _riff_chunk(b"LIST", b"strl" + _riff_chunk(b"strh", strh) + _riff_chunk(b"strf", strf))
    header = _riff_chunk(b"LIST", b"hdrl" + _riff_chunk(b"avih", avih) + stream)
    movi, index, offset = b"", b"", 4
    for data in frames:
        chunk = _riff_chunk(b"00dc", data)
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(data))
        movi += chunk
        offset += len(chunk)
    body = b"AVI " + header + _riff_chunk(b"LIST", b"movi" + movi) + _riff_chunk(b"idx1", index)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def plain_jpeg(width: int, height: int, quality: int = 30) -> bytes:
    """A flat JPEG of this size: a few kilobytes however large."""
    return encode(Image.new("RGB", (width, height), (120, 100, 90)), "JPEG", quality=quality)


def jpeg_with_segments_first(width: int, height: int, padding: int) -> bytes:
    """A JPEG whose frame header comes after `padding` bytes of comment segments, past what a first look parses."""
    plain = encode(Image.new("RGB", (width, height), (100, 90, 80)), "JPEG", quality=20)
    segment = b"\xff\xfe" + (65002).to_bytes(2, "big") + b"x" * 65000
    return plain[:2] + segment * (padding // len(segment) + 1) + plain[2:]


def tiff_directory_last(width: int, height: int) -> bytes:
    """A deflated grey TIFF whose directory (its size) is written after the pixel data, as libtiff does."""
    pixels = np.random.default_rng(0).integers(0, 2, (height, width), dtype=np.uint8) * 90
    return encode(Image.fromarray(pixels), "TIFF", compression="tiff_deflate")
