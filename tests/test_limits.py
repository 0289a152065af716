"""Bounded work per upload: JPEG structure checked before decoding, a decode deadline, and
admission control in front of the prepare threads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import SHIPPED_CHECKPOINT
from models.engine import Engine, EngineConfig
from models.errors import ImageTooLargeError, InvalidImageError, QueueFullError
from models.preprocessing import MAX_JPEG_SCANS, decode_image, decode_photo
from tests.images import encode, face_png


def noise(width: int, height: int) -> Image.Image:
    """Incompressible pixels: a photo-sized file that takes real time to decode."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def progressive_jpeg(size: int = 256) -> bytes:
    return encode(noise(size, size), "JPEG", quality=90, progressive=True)


def with_repeated_last_scan(data: bytes, copies: int) -> bytes:
    """The progressive JPEG with its last scan repeated: what a decode-time bomb does, thousands of times."""
    last = data.rfind(b"\xff\xda")
    end = data.rfind(b"\xff\xd9")
    return data[:end] + data[last:end] * copies + data[end:]


def test_a_photos_progressive_jpeg_decodes() -> None:
    data = progressive_jpeg()
    assert 2 <= data.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert decode_image(data).size == (256, 256)


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    bomb = with_repeated_last_scan(progressive_jpeg(), MAX_JPEG_SCANS)
    with pytest.raises(ImageTooLargeError, match=r"scans, and at most 64 are accepted"):
        decode_image(bomb)


@pytest.mark.parametrize("after_header", [20, 5000])
def test_a_jpeg_cut_off_inside_its_scan_is_refused_as_truncated(after_header: int) -> None:
    whole = encode(noise(3000, 2000), "JPEG", quality=90)  # its header claims 6 megapixels
    cut = whole[: whole.find(b"\xff\xda") + after_header]
    with pytest.raises(InvalidImageError, match="truncated: it ends inside its last scan"):
        decode_image(cut)


def test_a_decode_past_its_deadline_is_stopped() -> None:
    data = encode(noise(1500, 1000), "PNG")
    assert decode_photo(data, timeout_s=60).image.size == (1500, 1000)
    with pytest.raises(ImageTooLargeError, match="took more than 1e-09 s to decode"):
        decode_photo(data, timeout_s=1e-9)


def test_pillows_own_bomb_guard_names_our_limit() -> None:
    header_only = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 megapixels in a few kilobytes
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000,000 pixels"):
        decode_image(header_only, max_pixels=1_000_000)


@pytest.fixture()
def engine() -> Iterator[Engine]:
    config = EngineConfig(threads=1, prepare_workers=1, max_pending_pixels=3_000_000)
    loaded = Engine.load(SHIPPED_CHECKPOINT, config)
    yield loaded
    loaded.close()


def test_photos_beyond_the_pending_pixels_are_refused_at_once_and_crops_still_answer(engine: Engine) -> None:
    photo = encode(noise(2000, 1000), "PNG")  # 2 megapixels: one fits, a second one waiting does not

    async def flood() -> list[object]:
        return await asyncio.gather(
            engine.classify(photo), engine.classify(photo), engine.classify(face_png(1)), return_exceptions=True
        )

    first, second, crop = asyncio.run(flood())
    assert not isinstance(first, BaseException)
    assert isinstance(second, QueueFullError) and "retry in a moment" in str(second)
    assert not isinstance(crop, BaseException)  # decoded inline: never waits behind photos
    assert not isinstance(asyncio.run(engine.classify(photo)), BaseException)  # the pixels were given back


def test_a_batch_that_finds_the_decoders_full_is_refused_whole(engine: Engine) -> None:
    photo = encode(noise(2000, 1000), "PNG")
    with pytest.raises(QueueFullError):
        asyncio.run(engine.classify_batch([photo, photo, face_png(2)]))
