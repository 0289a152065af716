"""Bounded work per upload: JPEG structure checked before decoding, a decode deadline, and
admission control in front of the prepare threads."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import SHIPPED_CHECKPOINT
from models.config import EngineConfig
from models.decoding import (
    COST_HEADER_BYTES,
    MAX_JPEG_SCANS,
    decode_image,
    decode_photo,
    looks_like_image,
    read_header,
)
from models.engine import Engine
from models.errors import ImageTooLargeError, InvalidImageError, QueueFullError
from models.pixel_admission import PixelAdmission
from models.scheduling import runs_inline
from tests.hostile import bmff_disguised_as_a_crop, crafted_late_tiff, tiff_layout
from tests.images import encode, face_png, jpeg_with_segments_first, tiff_directory_last


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
    with pytest.raises(ImageTooLargeError, match=r"more than 64 scans"):
        decode_image(bomb)


@pytest.mark.parametrize("after_header", [20, 5000])
def test_a_jpeg_cut_off_inside_its_scan_is_refused_as_truncated(after_header: int) -> None:
    whole = encode(noise(3000, 2000), "JPEG", quality=90)  # its header claims 6 megapixels
    cut = whole[: whole.find(b"\xff\xda") + after_header]
    with pytest.raises(InvalidImageError, match="truncated: it ends inside its last scan"):
        decode_image(cut)


def test_a_decode_past_its_deadline_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(3000, 3000), "PNG")  # 27 MB of pixels that do not compress: ~1,700 blocks to read
    assert decode_photo(data, timeout_s=60).image.size == (3000, 3000)
    # A clock that moves one second per look: the header is read in a few looks, the pixels take
    # hundreds, whatever this machine's speed.
    ticks = itertools.count()
    monkeypatch.setattr("models.decoding.monotonic", lambda: float(next(ticks)))
    with pytest.raises(ImageTooLargeError, match=r"took more than 50 s to decode and was stopped"):
        decode_photo(data, timeout_s=50)


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


def test_a_batch_that_finds_the_decoders_busy_with_others_waits_its_turn(engine: Engine) -> None:
    photo = encode(noise(2000, 1000), "PNG")

    async def photo_then_batch() -> list[object]:
        return await asyncio.gather(
            engine.classify(photo), engine.classify_batch([photo, photo, face_png(2)]), return_exceptions=True
        )

    alone, batch = asyncio.run(photo_then_batch())
    assert not isinstance(alone, BaseException)
    assert isinstance(batch, list) and all(not isinstance(item, BaseException) for item in batch), batch


def test_a_batch_alone_is_never_refused_by_its_own_images(engine: Engine) -> None:
    photo = encode(noise(2000, 1000), "PNG")  # four of them are 8 megapixels, over the bound of 3
    answers = asyncio.run(engine.classify_batch([photo] * 4 + [face_png(3)]))
    assert all(not isinstance(answer, BaseException) for answer in answers)


def test_a_jpeg_with_a_video_after_its_end_marker_is_a_photo() -> None:
    # Google's and Samsung's motion photos append an MP4; random bytes hold FF DA and FF D9 often.
    photo = encode(noise(400, 300), "JPEG", quality=90)
    trailer = np.random.default_rng(1).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    assert trailer.count(b"\xff\xda") > 10  # markers a whole-file search would have counted
    assert decode_image(photo + trailer).size == (400, 300)


def test_a_jpeg_with_an_exif_thumbnail_is_a_photo() -> None:
    thumbnail = encode(noise(160, 120), "JPEG", quality=80)  # a whole JPEG, scans and all, inside APP1
    exif = Image.Exif()
    exif[0x010E] = "a picture"
    app1 = b"Exif\x00\x00" + exif.tobytes() + thumbnail
    photo = encode(noise(400, 300), "JPEG", quality=90)
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    with_thumbnail = photo[:2] + segment + photo[2:]
    assert with_thumbnail.count(b"\xff\xda") == 2
    assert decode_image(with_thumbnail).size == (400, 300)


def test_junk_between_jpeg_segments_is_refused_before_pillow_walks_it() -> None:
    photo = encode(noise(64, 64), "JPEG", quality=90)
    with pytest.raises(InvalidImageError, match="no marker at byte"):
        decode_image(photo[:2] + b"\x00" * 1_000_000 + photo[2:])


def test_a_batch_whose_images_add_up_to_too_many_pixels_is_refused_from_their_headers() -> None:
    config = EngineConfig(threads=1, prepare_workers=1, max_batch_pixels=5_000_000)
    engine = Engine.load(SHIPPED_CHECKPOINT, config)
    try:
        header_only = encode(Image.new("1", (2000, 1000)), "PNG")  # 2 megapixels, a few hundred bytes
        with pytest.raises(ImageTooLargeError, match="add up to 6,000,000 pixels"):
            asyncio.run(engine.classify_batch([header_only] * 3))
        assert len(asyncio.run(engine.classify_batch([header_only] * 2))) == 2
    finally:
        engine.close()


def test_a_header_past_the_first_look_is_still_read_for_admission() -> None:
    late = jpeg_with_segments_first(6000, 4000, 300_000)
    assert late.find(b"\xff\xc0") > COST_HEADER_BYTES  # the frame header lies past the first look
    header = read_header(late, 960)
    assert header is not None and (header.width, header.height, header.cost) == (6000, 4000, 1500 * 1000)
    assert read_header(b"not an image at all") is None
    tiff = tiff_directory_last(2000, 1500)
    assert int.from_bytes(tiff[4:8], "little") > COST_HEADER_BYTES  # its directory comes after the pixels
    header = read_header(tiff)
    assert header is not None and (header.width, header.height) == (2000, 1500)


def test_a_late_tiff_directory_that_names_its_size_twice_is_read_as_pillow_reads_it() -> None:
    tiff = crafted_late_tiff(100, 80, repeated_size=(10, 10))
    header = read_header(tiff)
    assert header is not None and (header.width, header.height) == (100, 80)  # the first, not the last
    assert decode_photo(tiff).image.size == (100, 80)


def test_a_bigtiff_whose_size_is_past_the_first_look_counts_as_the_largest_image_not_as_none() -> None:
    bigtiff = crafted_late_tiff(100, 80, big=True)
    # No size to read, but an image: admission charges it the pixel limit, as any image of unknown size.
    assert read_header(bigtiff) is None and looks_like_image(bigtiff)
    assert decode_photo(bigtiff).image.size == (100, 80)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_an_image_larger_than_its_header_declares_is_refused_before_decoding(fmt: str) -> None:
    disguised = bmff_disguised_as_a_crop(fmt, 320, 240)
    header = read_header(disguised)
    assert header is not None and (header.width, header.height) == (64, 48)  # what admission would count
    with pytest.raises(InvalidImageError, match="declares 64×48 pixels but holds a 320×240 image"):
        decode_photo(disguised, max_pixels=40_000_000)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_the_word_ispe_in_a_photos_text_is_not_taken_for_its_size(fmt: str) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:title>Whispering pines</dc:title></x:xmpmeta>'
    photo = encode(Image.new("RGB", (640, 480), (120, 110, 100)), fmt, xmp=xmp)
    assert b"Whispering" in photo
    header = read_header(photo)
    assert header is not None and (header.width, header.height) == (640, 480)
    assert decode_photo(photo, max_pixels=40_000_000).image.size == (640, 480)


@pytest.mark.parametrize("params", [{"quality": 95}, {"lossless": True}], ids=["lossy", "lossless"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_webp_larger_than_the_first_look_is_counted_at_its_size(mode: str, params: dict[str, object]) -> None:
    webp = encode(noise(1200, 900).convert(mode), "WEBP", **params)
    assert len(webp) > COST_HEADER_BYTES  # Pillow cannot open it from the first look alone
    header = read_header(webp)
    assert header is not None and (header.format, header.width, header.height) == ("WEBP", 1200, 900)


def test_tiffs_whose_tiles_or_strips_exceed_their_image_are_refused_before_decoding() -> None:
    # Tiles padded as writers pad them: one 1024-px tile for a small image, 256-px ones for a larger.
    assert decode_photo(tiff_layout(100, 80, tile=1024)).image.size == (100, 80)
    assert decode_photo(tiff_layout(600, 600, tile=256)).image.size == (600, 600)
    assert decode_photo(tiff_layout(100, 80)).image.size == (100, 80)
    with pytest.raises(InvalidImageError, match="100×80 image is stored in tiles of 2048×2048 that decode 4,194,304"):
        decode_photo(tiff_layout(100, 80, tile=2048))
    with pytest.raises(InvalidImageError, match="16×20000 image is stored in tiles of 512×512 that decode 10,485,760"):
        decode_photo(tiff_layout(16, 20_000, tile=512))  # each tile within bounds, their sum not
    with pytest.raises(InvalidImageError, match="lists 200 strips for a 100×80 image that has 2"):
        decode_photo(tiff_layout(100, 80, strip_lists=100))


def test_only_formats_decoded_by_their_headers_size_are_prepared_on_the_event_loop() -> None:
    crop = Image.new("RGB", (48, 48), (90, 80, 70))
    for fmt, inline in (("PNG", True), ("JPEG", True), ("WEBP", True), ("AVIF", False), ("TIFF", False)):
        data = encode(crop, fmt)
        assert runs_inline(data, read_header(data)) is inline, fmt


def test_a_batch_of_images_whose_headers_lie_late_is_counted_and_refused_over_its_total() -> None:
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, max_batch_pixels=2_000_000))
    late = jpeg_with_segments_first(6000, 4000, 300_000)  # 1.5 M pixels to decode at a quarter

    async def run() -> object:
        return await engine.classify_batch([late, late])

    try:
        with pytest.raises(ImageTooLargeError, match="add up to 3,000,000 pixels to decode"):
            asyncio.run(run())
    finally:
        engine.close()


def test_a_waiting_batch_image_is_not_starved_by_steady_photos() -> None:
    """The head of the line reserves its pixels: photos arriving behind it are refused until it gets in."""
    admission = PixelAdmission(max_pending_pixels=16_000_000)
    photo, later_photo, batch = object(), object(), object()

    async def run() -> None:
        admission.admit_now(photo, 4_000_000)  # a photo being decoded
        waiting = asyncio.ensure_future(admission.admit_waiting(batch, 40_000_000, deadline=math.inf))
        await asyncio.sleep(0)  # it is in line, and at its head
        assert not waiting.done()
        with pytest.raises(QueueFullError, match="decoding 44,000,000 pixels of other uploads"):
            admission.admit_now(later_photo, 1_000_000)  # the reservation counts: no jumping the line
        admission.release(photo, 4_000_000)
        await asyncio.wait_for(waiting, 5)  # nothing else decoding: the batch's image gets in
        with pytest.raises(QueueFullError):
            admission.admit_now(later_photo, 1_000_000)  # now it is being decoded
        admission.release(batch, 40_000_000)
        admission.admit_now(later_photo, 1_000_000)

    asyncio.run(run())


def test_a_waiting_batch_image_is_refused_in_one_line_at_its_deadline() -> None:
    admission = PixelAdmission(max_pending_pixels=16_000_000)
    photo, batch = object(), object()

    async def run() -> None:
        admission.admit_now(photo, 4_000_000)
        deadline = asyncio.get_running_loop().time()  # already passed: no waiting on a clock
        with pytest.raises(QueueFullError, match="no room to decode this image's 40,000,000 pixels"):
            await admission.admit_waiting(batch, 40_000_000, deadline)
        admission.admit_now(object(), 1_000_000)  # its place in line is gone with it

    asyncio.run(run())


@pytest.mark.parametrize("turns", range(6))
def test_a_waiting_image_cancelled_as_room_frees_up_stays_cancelled(turns: int) -> None:
    """A cancel (Ctrl-C in `fer predict`, a client gone) that lands as the wake-up does is not lost.

    Python 3.11's `asyncio.wait_for` returned the wake-up's result in that moment and dropped the
    cancel, so `fer predict` once ran on to the end after Ctrl-C. Each `turns` lands the cancel at
    another step of the wake-up; whenever it is accepted, the wait must end cancelled, holding nothing.
    """
    admission = PixelAdmission(max_pending_pixels=16_000_000)
    photo, batch = object(), object()

    async def run() -> None:
        admission.admit_now(photo, 16_000_000)
        waiting = asyncio.ensure_future(admission.admit_waiting(batch, 8_000_000, deadline=math.inf))
        await asyncio.sleep(0)  # in line
        admission.release(photo, 16_000_000)  # room: the wake-up is on its way
        for _ in range(turns):
            await asyncio.sleep(0)
        accepted = waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            admission.admit_now(object(), 16_000_000)  # it took no pixels with it
            return
        assert not accepted, "the wait was cancelled but went on and admitted the image"
        admission.release(batch, 8_000_000)

    asyncio.run(run())


def test_a_decode_whose_request_went_away_stops() -> None:
    import threading

    from models.errors import DecodeCancelledError

    data = encode(noise(3000, 3000), "PNG")
    gone = threading.Event()
    gone.set()  # its request left before the pixels were read
    with pytest.raises(DecodeCancelledError, match="its request went away"):
        decode_photo(data, stop=gone)
    assert decode_photo(data, stop=threading.Event()).image.size == (3000, 3000)
