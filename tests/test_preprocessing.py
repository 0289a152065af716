from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.decoding import decode_image
from models.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError
from models.preprocessing import PreprocessingSpec, preprocess, preprocess_bytes
from tests.conftest import make_face

SPEC = PreprocessingSpec()


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def as_mode(face: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":
        wide = np.asarray(face, dtype=np.uint16) * 257  # the lossless 8 → 16-bit widening
        return Image.fromarray(wide)  # uint16 → mode I;16
    if mode == "LA":
        return Image.merge("LA", (face, Image.new("L", face.size, 255)))
    if mode == "P":
        return face.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return face.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "LA"])
def test_same_face_in_any_lossless_mode_gives_the_same_tensor(mode: str) -> None:
    face = make_face(7, size=40)
    expected = preprocess_bytes(encode(face), SPEC)
    converted = as_mode(face, mode)
    if mode == "P":  # a 256-colour palette holds every grey level of the face exactly
        assert np.array_equal(np.asarray(converted.convert("L")), np.asarray(face))
    assert np.array_equal(preprocess_bytes(encode(converted), SPEC), expected)


def test_output_is_normalised_single_channel_48x48() -> None:
    tensor = preprocess(Image.new("L", (100, 80), 255), SPEC)
    assert tensor.shape == (1, 48, 48)
    assert tensor.dtype == np.float32
    assert np.allclose(tensor, 1.0)


def test_exif_orientation_is_applied() -> None:
    face = make_face(3, size=48).crop((0, 0, 48, 40))  # not square, so a wrong rotation shows
    expected = preprocess_bytes(encode(face), SPEC)
    rotated = face.transpose(Image.Transpose.ROTATE_90)  # stored sideways …
    exif = Image.Exif()
    exif[0x0112] = 6  # … with the tag that says "rotate 90° clockwise to display"
    assert np.array_equal(preprocess_bytes(encode(rotated, exif=exif), SPEC), expected)
    jpeg = preprocess_bytes(encode(rotated, "JPEG", exif=exif, quality=95), SPEC)
    assert np.abs(jpeg - expected).mean() < 0.05  # within JPEG's loss (2% of the [-1, 1] range)


def test_cmyk_jpeg_decodes_to_grayscale() -> None:
    tensor = preprocess_bytes(encode(make_face(1).convert("CMYK"), "JPEG"), SPEC)
    assert tensor.shape == (1, 48, 48)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidImageError, "empty"),
        (b"hello, world", InvalidImageError, "not a recognisable image"),
        (b"\x89PNG\r\n\x1a\n" + b"junk" * 10, InvalidImageError, "image"),
        (b"%PDF-1.4\n" + b"0" * 200, UnsupportedImageError, "a PDF document"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImageError, "SVG"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", UnsupportedImageError, "HTML page"),
    ],
)
def test_bad_bytes_raise_a_domain_error(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_image(data)


def test_truncated_png_is_invalid() -> None:
    data = encode(make_face(2, size=200))
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("1", (3000, 3000)))  # a few KB that decode to 9 megapixels
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000,000"):
        decode_image(data, max_pixels=1_000_000)


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(UnsupportedImageError, match="ICO images are not accepted"):
        decode_image(encode(make_face(1), "ICO"))


def test_serving_and_evaluation_give_the_same_tensor(tmp_path: Path) -> None:
    from models.preprocessing import to_model_input
    from tests.conftest import write_dataset
    from training.data import load_split

    root = write_dataset(tmp_path / "val", {"happy": 2, "sad": 1})
    split = load_split(root, SPEC, cache_dir=tmp_path / "cache")
    for index, relative in enumerate(split.paths):
        served = preprocess_bytes((root / relative).read_bytes(), SPEC)
        evaluated = to_model_input(split.pixels[index : index + 1], SPEC)[0]
        assert np.array_equal(served, evaluated)


def test_concurrent_cache_builders_do_not_trip_over_each_other(tmp_path: Path) -> None:
    """torchrun ranks build the same cache at once; each must get the split and leave one file."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tests.conftest import write_dataset
    from training.data import load_split

    root = write_dataset(tmp_path / "train", {"happy": 6, "sad": 6}, seed=3)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=6) as pool:
        splits = list(pool.map(lambda _: load_split(root, SPEC, cache_dir=cache), range(6)))
    for split in splits:
        assert np.array_equal(split.pixels, splits[0].pixels) and split.paths == splits[0].paths
    assert [path.suffix for path in cache.iterdir()] == [".npz"]  # no temporary file left behind
    cached = load_split(root, SPEC, cache_dir=cache)
    assert np.array_equal(cached.pixels, splits[0].pixels)
