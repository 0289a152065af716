"""Hostile and odd uploads, generated: each with the status the service must answer."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

from tests.conftest import make_face
from tests.images import encode


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height, followed by a tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [make_face(seed).convert("P") for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def palette_png_with_transparency() -> bytes:
    image = make_face(4).convert("P")
    return encode(image, transparency=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(make_face(5).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.asarray(make_face(6), dtype=np.uint16) * 257))


def junk(size: int, seed: int) -> bytes:
    """Seeded random bytes: the same junk every run, so every case has one expected status."""
    return random.Random(seed).randbytes(size)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def bmff_claiming(fmt: str, width: int, height: int) -> bytes:
    """A small AVIF or HEIC whose `ispe` box (the image's declared size) says `width`×`height`."""
    import pillow_heif

    pillow_heif.register_heif_opener()  # Pillow writes HEIC through it, as the service reads it
    data = bytearray(encode(Image.new("RGB", (64, 48), (100, 90, 80)), fmt))
    at = data.find(b"ispe")
    data[at + 8 : at + 16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int, int]]:
    """The ISO-BMFF boxes between `start` and `end`: (type, offset, size, header length)."""
    found, position = [], start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[position + 8 : position + 16])[0], 16
        found.append((kind, position, size or end - position, header))
        position += size or end - position
    return found


def _shift_item_offsets(data: bytes, delta: int) -> bytes:
    """The file with its `iloc` box's absolute file offsets moved by `delta` (bytes were inserted before them)."""
    out = bytearray(data)
    meta = next(box for box in _boxes(data, 0, len(data)) if box[0] == b"meta")
    iloc = next(box for box in _boxes(data, meta[1] + meta[3] + 4, meta[1] + meta[2]) if box[0] == b"iloc")
    position = iloc[1] + iloc[3]
    version = out[position]
    position += 4
    offset_size, length_size = out[position] >> 4, out[position] & 15
    base_size, index_size = out[position + 1] >> 4, (out[position + 1] & 15) if version in (1, 2) else 0
    position += 2

    def read(size: int) -> tuple[int, int]:
        nonlocal position
        at, position = position, position + size
        return at, int.from_bytes(out[at:position], "big") if size else 0

    def shift(at: int, size: int) -> None:
        out[at : at + size] = (int.from_bytes(out[at : at + size], "big") + delta).to_bytes(size, "big")

    _, items = read(2 if version < 2 else 4)
    for _ in range(items):
        read(2 if version < 2 else 4)  # item id
        construction = read(2)[1] & 15 if version in (1, 2) else 0
        read(2)  # data reference index
        base_at, base = read(base_size)
        _, extents = read(2)
        if construction == 0 and base_size and base:
            shift(base_at, base_size)
        for _ in range(extents):
            read(index_size)
            offset_at, _ = read(offset_size)
            read(length_size)
            if construction == 0 and not (base_size and base) and offset_size:
                shift(offset_at, offset_size)
    return bytes(out)


def bmff_disguised_as_a_crop(fmt: str, width: int = 320, height: int = 240) -> bytes:
    """An AVIF or HEIC of `width`×`height` with 64 `ispe` boxes claiming 64×48 in a `free` box before its real one.

    A reader that stops at the first 64 `ispe` boxes takes it for a face crop; its decoder opens the real image.
    """
    import pillow_heif

    pillow_heif.register_heif_opener()
    data = encode(Image.effect_noise((width, height), 40).convert("RGB"), fmt)
    fake = (struct.pack(">I", 20) + b"ispe" + bytes(4) + struct.pack(">II", 64, 48)) * 64
    free = struct.pack(">I", 8 + len(fake)) + b"free" + fake
    ftyp_end = struct.unpack(">I", data[:4])[0]
    return _shift_item_offsets(data[:ftyp_end] + free + data[ftyp_end:], len(free))


def crafted_late_tiff(
    width: int, height: int, *, repeated_size: tuple[int, int] | None = None, big: bool = False
) -> bytes:
    """A hand-made grey deflate TIFF (BigTIFF with `big`) whose directory lies past the first 256 KiB of the file
    (`tests.images.tiff_directory_last` is the plain one Pillow writes).

    `repeated_size`: a second ImageWidth and ImageLength after the first (Pillow keeps the first).
    """
    strip = zlib.compress(bytes(range(256)) * (width * height // 256) + bytes(width * height % 256), 9)
    header_bytes = 16 if big else 8
    directory_at = header_bytes + len(strip) + 300_000
    entry = struct.Struct("<HHQQ" if big else "<HHII")
    entries = [
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1),
        (273, 4, header_bytes), (277, 3, 1), (278, 4, height), (279, 4, len(strip)),
    ]  # fmt: skip
    if repeated_size:
        entries += [(256, 4, repeated_size[0]), (257, 4, repeated_size[1])]
    count = struct.pack("<Q" if big else "<H", len(entries))
    directory = (
        count + b"".join(entry.pack(tag, kind, 1, value) for tag, kind, value in entries) + bytes(8 if big else 4)
    )
    head = b"II+\x00" + struct.pack("<HHQ", 8, 0, directory_at) if big else b"II*\x00" + struct.pack("<I", directory_at)
    return head + strip + bytes(directory_at - header_bytes - len(strip)) + directory


def tiff_layout(width: int, height: int, *, tile: int | None = None, strip_lists: int = 1) -> bytes:
    """A hand-made grey TIFF: in deflated `tile`×`tile` tiles (all one blob), or in two strips listed `strip_lists` times."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1)]
    if tile:
        pixels = zlib.compress(bytes(tile * tile), 9)
        tiles = -(-width // tile) * -(-height // tile)
        entries += [(259, 3, 1, 8), (322, 4, 1, tile), (323, 4, 1, tile)]
        if tiles == 1:  # one value fits in its entry
            arrays = b""
            entries += [(324, 4, 1, 8), (325, 4, 1, len(pixels))]
        else:
            arrays_at = 8 + len(pixels)
            arrays = struct.pack(f"<{tiles}I", *[8] * tiles) + struct.pack(f"<{tiles}I", *[len(pixels)] * tiles)
            entries += [(324, 4, tiles, arrays_at), (325, 4, tiles, arrays_at + 4 * tiles)]
    else:
        rows = -(-height // 2)
        pixels = bytes(range(256)) * (width * height // 256) + bytes(width * height % 256)
        starts, counts = [8, 8 + width * rows] * strip_lists, [width * rows, width * (height - rows)] * strip_lists
        arrays_at = 8 + len(pixels)
        arrays = struct.pack(f"<{len(starts)}I", *starts) + struct.pack(f"<{len(counts)}I", *counts)
        entries += [(259, 3, 1, 1), (273, 4, len(starts), arrays_at), (278, 4, 1, rows)]
        entries += [(279, 4, len(counts), arrays_at + 4 * len(starts))]
    directory_at = 8 + len(pixels) + len(arrays)
    packed = b"".join(
        struct.pack("<HHI", tag, kind, count)
        + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, count, value in sorted(entries)
    )
    return (
        b"II*\x00"
        + struct.pack("<I", directory_at)
        + pixels
        + arrays
        + struct.pack("<H", len(entries))
        + packed
        + bytes(4)
    )


def photo(fmt: str, **params: object) -> bytes:
    return encode(Image.effect_noise((320, 240), 60).convert("RGB"), fmt, **params)


# (case, body bytes, expected status, fragment of the detail; "" for a 200)
IMAGE_CASES: list[tuple[str, bytes, int, str]] = [
    ("zero bytes", b"", 400, "empty"),
    ("plain text", b"this is not an image\n" * 20, 400, "not a recognisable image"),
    ("html", b"<!DOCTYPE html><html><body><img src=x></body></html>", 415, "HTML page"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48"><circle r="9"/></svg>', 415, "SVG"),
    ("pdf", b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", 415, "PDF document"),
    ("random bytes", junk(4096, 1), 400, "not a recognisable image"),
    ("png magic then junk", b"\x89PNG\r\n\x1a\n" + junk(500, 2), 400, "not a recognisable image"),
    ("jpeg magic then junk", b"\xff\xd8\xff\xe0" + junk(500, 3), 400, "JPEG data is truncated"),
    ("gif magic then junk", b"GIF89a\x30\x00\x30\x00" + junk(500, 4), 400, "not a recognisable image"),
    ("truncated jpeg", truncated(photo("JPEG")), 400, "truncated"),
    ("truncated png", truncated(photo("PNG")), 400, "truncated or corrupt"),
    ("truncated gif", truncated(photo("GIF")), 400, "truncated or corrupt"),
    ("truncated webp", truncated(photo("WEBP")), 400, "the file is damaged"),
    ("header claims 0x0", png_with_header(0, 0), 400, "not a recognisable image"),
    ("header claims 60000x60000", png_with_header(60000, 60000), 413, "over the limit of"),
    ("avif claims 60000x60000", bmff_claiming("AVIF", 60000, 60000), 413, "60000×60000 = 3,600,000,000 pixels"),
    ("heic claims 60000x60000", bmff_claiming("HEIF", 60000, 60000), 413, "60000×60000 = 3,600,000,000 pixels"),
    ("avif declares a crop, holds a photo", bmff_disguised_as_a_crop("AVIF"), 400, "declares 64×48 pixels but holds"),
    ("heic declares a crop, holds a photo", bmff_disguised_as_a_crop("HEIF"), 400, "declares 64×48 pixels but holds"),
    ("1-bit png 12000x12000", encode(Image.new("1", (12000, 12000))), 413, "144,000,000 pixels"),
    ("ico", encode(Image.new("RGB", (32, 32)), "ICO"), 415, "ICO images are not accepted"),
    ("animated gif", animated_gif(), 200, ""),
    ("cmyk jpeg", encode(make_face(1).convert("CMYK"), "JPEG"), 200, ""),
    ("16-bit png", sixteen_bit_png(), 200, ""),
    ("palette png with transparency", palette_png_with_transparency(), 200, ""),
    ("exif-rotated jpeg", exif_rotated_jpeg(), 200, ""),
    ("1x1 image", encode(Image.new("L", (1, 1), 128)), 200, ""),
    ("bmp", encode(make_face(2), "BMP"), 200, ""),
    ("tiff", encode(make_face(3), "TIFF"), 200, ""),
    ("webp photo", photo("WEBP"), 200, ""),
]
