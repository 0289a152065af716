"""What `fer predict` reads and writes, whichever engine runs it: the files, the rows, the columns.

Local `fer predict` (cli/main.py) and `fer predict --engine ray` (cli/scale.py) list files, read
them and shape each one's answer here, so their outputs agree row for row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from models.answers import ImageAnswer
from models.config import ENGINE_DEFAULTS
from models.decoding import IMAGE_SUFFIXES

# A file larger than the largest image the engine decodes would be even uncompressed (8 bytes a
# pixel: 16-bit RGBA) cannot be one it accepts: it is a row with an error, never read into memory.
MAX_FILE_BYTES = 8 * ENGINE_DEFAULTS.max_pixels


def iter_images(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given, and the images under directories, recursively, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def read_image_file(path: Path) -> bytes | OSError:
    """The file's bytes, or the error that stands in its row (unreadable, missing, too large)."""
    try:
        with path.open("rb") as file:
            # The size first, so that a huge file costs nothing; the bounded read also holds for one still growing.
            size = os.fstat(file.fileno()).st_size
            data = file.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
    except OSError as exc:
        return exc
    if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
        return OSError(
            f"{path}: over {MAX_FILE_BYTES // 2**20} MiB, more than any image of at most "
            f"{ENGINE_DEFAULTS.max_pixels:,} pixels needs: not read"
        )
    return data


def result_row(path: str, answer: ImageAnswer | Exception) -> dict[str, Any]:
    """One file's result as `fer predict` writes it: label, confidence, probabilities, the face box."""
    if isinstance(answer, Exception):
        return {"path": path, "error": str(answer)}
    face = answer.faces[0]
    return {
        "path": path,
        "label": face.prediction.label,
        "confidence": face.prediction.confidence,
        "probabilities": face.prediction.probabilities,
        "face": face.box.as_list() if face.box else None,
    }


def csv_columns(classes: Sequence[str]) -> list[str]:
    """The columns of `--format csv`, and of the Ray engine's Parquet and CSV part files."""
    return ["path", "label", "confidence", *classes, "face", "error"]


def face_text(face: Sequence[int] | None) -> str | None:
    """The face box as the CSV writes it: "x y w h" in the photo's pixels (None: no box)."""
    return " ".join(map(str, face)) if face else None
