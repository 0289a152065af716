"""Decoding uploads, and the defences against hostile files: bytes → an upright PIL image, within limits.

Every image the service, `fer predict` or training reads is decoded here. The header is read
once, on the event loop, for what admission needs (`read_header`: format, size, the pixels the
decode will produce); the pixels are decoded on a prepare thread (`decode_photo`): the pixel
limit checked from the header before any pixel is read, a JPEG's markers walked first (scan
bombs, junk between segments, truncation), a large JPEG decoded at 1/2-1/8 scale, the decode
stopped at a deadline, EXIF orientation applied.
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from time import monotonic
from typing import Literal

import pillow_heif
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from models.errors import DecodeCancelledError, FerError, ImageTooLargeError, InvalidImageError, UnsupportedImageError

# Formats a camera, a phone, a browser or an image library writes for a photo; anything else is
# refused before its pixels are read (Pillow would also open EPS, PSD, ICO and others we never
# test). MPO: the JPEGs many phones and cameras write with a multi-picture index (the first
# picture is the photo). HEIF: iPhones' default (HEIC), read by pillow-heif. AVIF: read by Pillow.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "AVIF"})
FORMAT_NAMES = "JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF"
# What a folder walk (`fer predict DIR`, a dataset folder) takes for an image file.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".mpo", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# JPEG decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost (Pillow's draft mode).
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
# A camera's or an encoder's progressive JPEG has about ten scans (libjpeg's default script has
# ten); a crafted one repeats a small scan thousands of times, and each scan is a pass over the
# whole image: 10,000 scans of a 6000×6000 image decoded for 28 s. Refused from the markers.
MAX_JPEG_SCANS = 64
# Segments before the image data: a photo has a dozen or so (APP, tables, frame, scans).
MAX_JPEG_SEGMENTS = 1000
# The end of entropy-coded data: an FF followed by anything but a stuffed 00 or a restart marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# The first byte that is not a fill byte (FF).
_NOT_FILL = re.compile(rb"[^\xff]")
# Pillow feeds the decoder this many bytes at a time; the decode deadline is checked between
# them, so a small block bounds how far past its deadline a slow decode can run.
DECODE_BLOCK_BYTES = 16 * 1024

pillow_heif.register_heif_opener()


def _document_kind(data: bytes) -> str | None:
    """Name well-known non-image documents, so that they get 415 rather than 'undecodable'."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"%pdf"):
        return "a PDF document"
    if b"<svg" in head:
        return "an SVG drawing (vector images are not accepted)"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    return None


def draft_scale(image_format: str | None, width: int, height: int, max_side: int | None) -> int:
    """The factor (1, 2, 4 or 8) by which `decode_photo` shrinks this image while decoding it."""
    if max_side is None or image_format not in DRAFT_FORMATS or max(width, height) < 2 * max_side:
        return 1
    scale = 1
    # libjpeg's DCT scaling: the smallest of 1/2, 1/4, 1/8 that keeps the longer side ≥ max_side.
    while scale < 8 and max(width, height) / (scale * 2) >= max_side:
        scale *= 2
    return scale


# The header `read_header` reads first: enough for a JPEG's frame after its EXIF and XMP segments,
# and for any other format's; only an upload whose header lies further is parsed whole.
COST_HEADER_BYTES = 256 * 1024
# The face-crop rule: an image whose shorter side is at most this many pixels is taken as a face
# already cut (FER2013's faces are 48×48) and is not searched for faces.
FACE_CROP_MAX_SIDE = 64


def is_face_crop_size(width: int, height: int) -> bool:
    """True when an image of this size is a face crop rather than a photo to search."""
    return min(width, height) <= FACE_CROP_MAX_SIDE


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, read before any pixel is: its format, size and decode cost."""

    format: str | None
    width: int
    height: int
    draft: int  # the factor `decode_photo` shrinks it by while decoding (1, 2, 4 or 8)

    @property
    def cost(self) -> int:
        """The pixels `decode_photo` will decode (a 12-megapixel JPEG at a quarter: 0.76 M)."""
        return self.width * self.height // (self.draft * self.draft)


# `ispe` boxes looked at, at most: a real HEIC has a few (the image, its tiles, a thumbnail).
MAX_ISPE_BOXES = 64
# Magic numbers of the formats accepted: an upload that starts with one of these but whose size
# cannot be found counts as the largest image (it may be one); anything else is no image at all.
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # +: BigTIFF


def declared_bmff_size(data: bytes) -> tuple[int, int] | None:
    """The largest (width, height) a HEIC or AVIF file declares in its `ispe` boxes; None for other files.

    libheif and libavif refuse an image over their own limits with a message that names no size
    ("BMFF parsing failed"); read from the boxes, such a file is 413 like any other, and
    admission counts it. The boxes are found wherever they are (after a large `free` box too),
    the first `MAX_ISPE_BOXES` of them: each search is one C-level scan.
    """
    if data[4:8] != b"ftyp":
        return None
    largest: tuple[int, int] | None = None
    position = data.find(b"ispe")
    for _ in range(MAX_ISPE_BOXES):
        if position < 4 or position + 16 > len(data):
            break
        # size (4) = 20, "ispe", version and flags (4) = 0, width (4), height (4): the word in a
        # photo's text ("Whispering" in its XMP) is not a box
        is_box = data[position - 4 : position] == b"\x00\x00\x00\x14" and data[position + 4 : position + 8] == bytes(4)
        width = int.from_bytes(data[position + 8 : position + 12], "big")
        height = int.from_bytes(data[position + 12 : position + 16], "big")
        if is_box and width and height and (largest is None or width * height > largest[0] * largest[1]):
            largest = (width, height)
        position = data.find(b"ispe", position + 4)
    return largest


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's (width, height) from its frame header, found by `jpeg_markers`' walk; None before a scan or at damage."""
    try:
        for count, (marker, position) in enumerate(jpeg_markers(data)):
            if count >= MAX_JPEG_SEGMENTS or marker in (0xD9, 0xDA):  # the end, or a scan, before any frame
                return None
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
                height = int.from_bytes(data[position + 5 : position + 7], "big")
                width = int.from_bytes(data[position + 7 : position + 9], "big")
                return (width, height) if position + 9 <= len(data) and width and height else None
    except InvalidImageError:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's (width, height) from its first chunk (Pillow's WebP reader needs the whole file to open it)."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # the canvas, 24-bit sizes minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: a key frame's 14-bit sizes
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """A TIFF's (width, height) from its first directory, wherever the header's offset puts it."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    offset = int.from_bytes(data[4:8], order)
    if offset + 2 > len(data):
        return None
    count = int.from_bytes(data[offset : offset + 2], order)
    size: dict[int, int] = {}
    for index in range(min(count, 512)):
        entry = data[offset + 2 + 12 * index : offset + 14 + 12 * index]
        if len(entry) < 12:
            return None
        tag, kind = int.from_bytes(entry[:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257) and tag not in size:  # ImageWidth, ImageLength: the first, as Pillow keeps it
            size[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (size[256], size[257]) if size.get(256) and size.get(257) else None


# What a TIFF's tiles may decode in all: four times its image, or a megapixel for a small one.
# Writers use fixed tiles (256 to 1024 px a side) whatever the image's size, and libtiff decodes
# whole tiles, so more than that is a bomb.
MAX_TIFF_TILE_OVERHEAD = 4
MIN_TIFF_TILE_PIXELS = 1024 * 1024


def check_tiff_layout(image: Image.Image) -> None:
    """Refuse a TIFF whose tiles or strips would make libtiff decode far more than its image, before any is.

    The size in its header bounds nothing by itself: one 64×48 image can sit in a 22000×22000
    tile (a 44 KB file that inflates to 1.4 GB), a 16-pixel-wide one in thousands of 512×512
    tiles, or an image can list thousands of strips over the same rows, each decoded in turn.

    Raises:
        InvalidImageError: tiles that decode too much in all, or more tiles or strips than the image has.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return
    width, height = image.size
    planes = int(tags.get(277, 1)) if tags.get(284, 1) == 2 else 1  # planar: one set of strips per sample
    if 322 in tags and 323 in tags:
        tile_width, tile_height = max(1, int(tags[322])), max(1, int(tags[323]))
        units = -(-width // tile_width) * -(-height // tile_height) * planes
        decoded = units // planes * tile_width * tile_height
        if decoded > max(MAX_TIFF_TILE_OVERHEAD * width * height, MIN_TIFF_TILE_PIXELS):
            raise InvalidImageError(
                f"the TIFF's {width}×{height} image is stored in tiles of {tile_width}×{tile_height} that "
                f"decode {decoded:,} pixels: the file is malformed"
            )
        listed, kind = len(tags.get(324, ())), "tiles"
    else:
        rows = max(1, min(int(tags.get(278, height)), height))
        units = -(-height // rows) * planes
        listed, kind = len(tags.get(273, ())), "strips"
    if listed > units:
        raise InvalidImageError(
            f"the TIFF lists {listed:,} {kind} for a {width}×{height} image that has {units:,}: the file is malformed"
        )


def read_header(data: bytes, max_side: int | None = None) -> ImageHeader | None:
    """The upload's header, as `decode_photo(data, max_side=…)` will see it; None when it cannot be read.

    It runs on the event loop, before admission, so it parses at most `COST_HEADER_BYTES` with
    Pillow. A header that lies further in is found by bounded, C-level walks instead: a JPEG's
    segments by their lengths up to its frame header, a TIFF's directory at the offset its
    header gives, a HEIC's or AVIF's `ispe` boxes (where their decoders would refuse to open
    an image over their own limits), a WebP's first chunk (Pillow opens a WebP only whole). An
    image counted as free would pass admission.
    """
    declared = declared_bmff_size(data)
    if declared is not None:
        return ImageHeader("AVIF" if data[8:12] in (b"avif", b"avis") else "HEIF", *declared, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut-off header warns before it fails
            image = Image.open(io.BytesIO(data[:COST_HEADER_BYTES]))
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                return None
            return ImageHeader(
                image.format, int(width), int(height), draft_scale(image.format, width, height, max_side)
            )
    except Exception:  # any damage, or a header past the first look: the walks below
        pass
    if data.startswith(b"\xff\xd8") and (size := _jpeg_frame_size(data)) is not None:
        return ImageHeader("JPEG", *size, draft_scale("JPEG", *size, max_side))
    if data[:4] in (b"II*\x00", b"MM\x00*") and (size := _tiff_size(data)) is not None:
        return ImageHeader("TIFF", *size, 1)
    if (size := _webp_size(data)) is not None and min(size) >= 1:
        return ImageHeader("WEBP", *size, 1)
    return None


def looks_like_image(data: bytes) -> bool:
    """True when the upload starts as an accepted image format does (its size may still be unreadable)."""
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or data[4:8] == b"ftyp"


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes into a loaded, upright PIL image at full resolution; see `decode_photo`."""
    return decode_photo(data, max_pixels).image


@dataclass(frozen=True)
class DecodedPhoto:
    """A decoded, upright image, and how many of the upload's pixels each of its pixels spans."""

    image: Image.Image
    scale: float  # 1.0 at full resolution, 4.0 for a JPEG decoded at a quarter of its size

    @property
    def full_size(self) -> tuple[int, int]:
        """The upload's (width, height) after EXIF orientation."""
        return round(self.image.width * self.scale), round(self.image.height * self.scale)


class DecodeDeadlineError(Exception):
    """Raised inside Pillow's read loop when a decode has run past its deadline."""


class _DeadlineBytes(io.BytesIO):
    """The upload's bytes, which refuse to be read any further once the deadline has passed or `stop` is set."""

    def __init__(self, data: bytes, deadline: float, stop: threading.Event | None = None) -> None:
        super().__init__(data)
        self.deadline = deadline
        self.stop = stop

    def read(self, size: int | None = -1) -> bytes:
        if monotonic() > self.deadline or (self.stop is not None and self.stop.is_set()):
            raise DecodeDeadlineError
        return super().read(size)


def check_jpeg_structure(data: bytes) -> None:
    """Walk a JPEG's segments up to its end-of-image marker: refuse a decode-time bomb or a cut-off file.

    Every scan starts with an SOS marker (FF DA); inside entropy-coded data an FF is always
    followed by 00 or a restart marker, so the next marker is found with one C-level search.
    Segments are skipped by their lengths, so an EXIF thumbnail inside APP1 is not counted, and
    whatever follows the first image's end-of-image marker (the other pictures of an MPO, the
    video of a "motion photo") is not looked at. A file with junk between its segments, or far
    too many of them, is refused before Pillow's own marker loop walks it byte by byte.

    Raises:
        ImageTooLargeError: more than `MAX_JPEG_SCANS` scans.
        InvalidImageError: the data ends before the end-of-image marker, or the structure is broken.
    """
    scans = 0
    for segments, (marker, _) in enumerate(jpeg_markers(data), 1):
        if marker == 0xD9:  # end of image: the first picture is complete
            return
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidImageError(f"the JPEG has more than {MAX_JPEG_SEGMENTS:,} segments: it is not a photo")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageTooLargeError(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans (a photo has about ten; each scan is a pass "
                    "over the whole image): re-save it as a baseline JPEG"
                )


def jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, position) of each of a JPEG's markers after its start, in order, up to its end-of-image marker.

    Fill bytes (FF) before a marker are skipped in one C-level search, a segment by its length,
    a scan's entropy-coded data by one search for the next marker (inside it an FF is always
    followed by 00 or a restart marker). A marker is yielded before its segment is skipped, so a
    caller can stop at it.

    Raises:
        InvalidImageError: the data ends before the end-of-image marker, or the structure is broken.
    """
    position, size = 2, len(data)
    while True:
        if position + 2 > size:
            raise InvalidImageError("the JPEG data is truncated: it ends before its end marker; send the whole file")
        if data[position] != 0xFF:
            raise InvalidImageError(f"the JPEG is damaged: no marker at byte {position:,}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill bytes before a marker: to the last of them
            found = _NOT_FILL.search(data, position)
            position = found.start() - 1 if found is not None else size - 1
            continue
        yield marker, position
        if marker == 0xD9:
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if position + 4 > size:
            raise InvalidImageError("the JPEG data is truncated: it ends inside a segment header")
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                raise InvalidImageError("the JPEG data is truncated: it ends inside its last scan; send the whole file")
            position = found.start()


def decode_photo(
    data: bytes,
    max_pixels: int | None = None,
    max_side: int | None = None,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> DecodedPhoto:
    """Decode image bytes into a loaded, upright PIL image, a JPEG at reduced scale when it is large.

    The pixel count is checked from the header, before any pixel is decoded, so a tiny file
    that claims 60000×60000 costs nothing; and the image Pillow opens may not be larger than
    that header (`read_header`, what admission counted), so a file that declares a face crop
    and holds a photo is refused before it is decoded. Animated images give their first frame. With
    `max_side`, a JPEG whose longer side is more than twice that is decoded at the smallest of
    1/2, 1/4 or 1/8 scale that keeps its longer side at least `max_side` (libjpeg's DCT scaling:
    a 12-megapixel photo decodes in about a tenth of the time); other formats decode whole.
    With `timeout_s`, a decode that is still reading the data after that long is stopped
    (checked between blocks of `DECODE_BLOCK_BYTES`; formats decoded in one call, HEIF and
    AVIF, are not interrupted); the same when `stop` is set (its request went away).

    Raises:
        InvalidImageError: empty, truncated or not an image at all.
        UnsupportedImageError: an image format we do not accept.
        ImageTooLargeError: more than `max_pixels` pixels.
    """
    if not data:
        raise InvalidImageError(f"the upload is empty: send a {FORMAT_NAMES} image")
    # What admission counted this upload as (the scheduler reads the same header from the same
    # bytes): the image Pillow opens must not be larger, or a file that declares one size and
    # holds another would be decoded beyond what was admitted, inline as a face crop even.
    header = read_header(data, max_side)
    if header is not None and max_pixels is not None and header.width * header.height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {header.width}×{header.height} = {header.width * header.height:,} pixels, over the "
            f"limit of {max_pixels:,}: downscale it before sending"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) between its own two limits; ours is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if data.startswith(b"\xff\xd8"):  # a JPEG (or MPO): its structure before Pillow walks it
                check_jpeg_structure(data)
            deadline = math.inf if timeout_s is None else monotonic() + timeout_s
            stream = _DeadlineBytes(data, deadline, stop)
            image: Image.Image = Image.open(stream)
    except (ImageTooLargeError, InvalidImageError):
        raise
    except DecodeDeadlineError:
        raise _stopped(stop, f"the image header took more than {timeout_s} s to read and was stopped") from None
    except UnidentifiedImageError:
        kind = _document_kind(data)
        if kind:
            raise UnsupportedImageError(f"this is {kind}, not a photo: send a {FORMAT_NAMES} image") from None
        raise InvalidImageError(f"the data is not a recognisable image: send a {FORMAT_NAMES} file") from None
    except Image.DecompressionBombError:
        # Pillow's own guard, far above ours: name our limit, which is the one to go by.
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels else "what can be decoded safely"
        raise ImageTooLargeError(f"the image is over {limit}: downscale it before sending") from None
    except Exception as exc:  # Pillow's plugins raise many types for malformed headers
        raise InvalidImageError(f"the image header could not be read ({exc}): the file is damaged") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImageError(f"{image.format} images are not accepted: send a {FORMAT_NAMES} image")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image claims a size of {width}×{height} pixels")
    if header is None and not looks_like_image(data):
        raise InvalidImageError(f"the data is not a recognisable image: send a {FORMAT_NAMES} file")  # admitted as free
    if image.format == "TIFF":
        check_tiff_layout(image)
    if header is not None and width * height > header.width * header.height:
        raise InvalidImageError(
            f"the file declares {header.width}×{header.height} pixels but holds a {width}×{height} image: "
            "it is inconsistent or damaged"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}×{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}: downscale it before sending"
        )
    scale = 1.0
    if (timeout_s is not None or stop is not None) and isinstance(image, ImageFile.ImageFile):
        image.decodermaxblock = DECODE_BLOCK_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            # The scale read_header predicted, so admission counts what is decoded.
            shrink = draft_scale(image.format, width, height, max_side)
            if shrink > 1:
                # Pillow takes the largest scale that divides both sides' requests: floor, not ceil.
                image.draft(image.mode, (max(1, width // shrink), max(1, height // shrink)))
                scale = width / image.size[0]
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels else "what can be decoded safely"
        raise ImageTooLargeError(f"the image is over {limit}: downscale it before sending") from None
    except DecodeDeadlineError:
        raise _stopped(
            stop, f"the image took more than {timeout_s} s to decode and was stopped: send a smaller or simpler image"
        ) from None
    except Exception as exc:  # truncated data surfaces as OSError, SyntaxError, ValueError …
        raise InvalidImageError(f"the image data is truncated or corrupt ({exc})") from None
    return DecodedPhoto(image, scale)


def _stopped(stop: threading.Event | None, past_deadline: str) -> FerError:
    """The error of a decode that was stopped: its caller went away, or it ran past its deadline."""
    if stop is not None and stop.is_set():
        return DecodeCancelledError("the decode was stopped: its request went away")
    return ImageTooLargeError(past_deadline)
