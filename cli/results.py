"""What `fer predict` reads and writes, whichever engine runs it: the files, the rows, the columns.

Local `fer predict` (cli/main.py) and `fer predict --engine ray` (cli/scale.py) list files, read
and classify them (`classify_files`) and shape each one's answer here, so their outputs agree
row for row.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from models.answers import ImageAnswer
from models.config import ENGINE_DEFAULTS
from models.decoding import IMAGE_SUFFIXES
from models.engine import Engine
from models.tta import TtaMode

Source = TypeVar("Source")  # what names a file to read: a local Path, or a URI's text

# A file larger than the largest image the engine decodes would be even uncompressed (8 bytes a
# pixel: 16-bit RGBA) cannot be one it accepts: it is a row with an error, never read into memory.
MAX_FILE_BYTES = 8 * ENGINE_DEFAULTS.max_pixels
# Bytes of files read and not yet answered (past one file, which may be up to MAX_FILE_BYTES).
MAX_BYTES_IN_FLIGHT = 256 * 2**20
# fer is the only client of its own engine: the service's per-request pixel budgets (admission,
# a batch upload's total) would only refuse a folder of real photos, so they are lifted; the
# per-image limits stay (FER_MAX_PIXELS, the decode deadline).
UNBOUNDED_REQUEST_PIXELS = {"max_pending_pixels": 2**62, "max_batch_pixels": 2**62}


def iter_images(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given, and the images under directories, recursively, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def read_image_file(path: Path) -> bytes | OSError:
    """The file's bytes, or the error that stands in its row (unreadable, missing, not a file, too large).

    Opened without blocking and checked to be a regular file before anything is read: a FIFO
    or a device named on the command line or in a manifest would otherwise hang the run.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return exc
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            return OSError(f"{path}: not a regular file (a FIFO, a device or a socket): not read")
        os.set_blocking(handle, True)
        with os.fdopen(handle, "rb", closefd=False) as file:
            # The size first, so that a huge file costs nothing; the bounded read also holds for one still growing.
            size = status.st_size
            data = file.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
    except OSError as exc:
        return exc
    finally:
        os.close(handle)
    if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
        return too_large(str(path))
    return data


def too_large(name: str) -> OSError:
    """The error in the row of a file larger than any image the engine accepts could be."""
    return OSError(
        f"{name}: over {MAX_FILE_BYTES // 2**20} MiB, more than any image of at most "
        f"{ENGINE_DEFAULTS.max_pixels:,} pixels needs: not read"
    )


async def classify_files(
    engine: Engine,
    paths: Sequence[Source],
    tta: TtaMode | None = None,
    *,
    in_flight: int = 128,
    read: Callable[[Source], bytes | OSError] = read_image_file,  # type: ignore[assignment]
    read_ahead: int = 0,
) -> AsyncIterator[tuple[Source, ImageAnswer | Exception]]:
    """Each file's answer (or the error in its place), in order, through the engine.

    Each file is read (`read`: a local file by default) just before it is prepared and let go
    once answered; at most `in_flight` files and `MAX_BYTES_IN_FLIGHT` bytes of them (one file,
    whatever its size) are held at once, so memory is bounded whatever the folder holds. Files
    are answered one by one: the per-image limits apply, no per-request total (the engine's
    batcher still batches the faces that are ready together). `read_ahead` reads run on threads
    ahead of the one being prepared, for stores where a read waits on the network (object
    storage): at most that many more files, each bounded by `MAX_FILE_BYTES`.
    """
    window: deque[tuple[Source, int, asyncio.Task[ImageAnswer | Exception]]] = deque()
    held = 0
    reads = _Reads(paths, read, read_ahead)

    async def one(blob: bytes) -> ImageAnswer | Exception:
        (answer,) = await engine.classify_batch([blob], tta=tta)
        return answer

    try:
        async for path, blob in reads:
            task: asyncio.Task[ImageAnswer | Exception]
            if isinstance(blob, OSError):
                size, task = 0, asyncio.ensure_future(_error(blob))
            else:
                size = len(blob)
                while window and (len(window) >= in_flight or held + size > MAX_BYTES_IN_FLIGHT):
                    done_path, done_size, done = window.popleft()
                    held -= done_size
                    yield done_path, await done
                task = asyncio.ensure_future(one(blob))
            del blob  # the task holds it until it is answered
            held += size
            window.append((path, size, task))
        while window:
            done_path, _, done = window.popleft()
            yield done_path, await done
    finally:  # a caller that stops early (an error, Ctrl-C) leaves nothing running
        for _, _, task in window:
            task.cancel()
        reads.close()


class _Reads(Generic[Source]):
    """The files' bytes in order: read inline, or up to `ahead` reads running on threads in front."""

    def __init__(self, paths: Sequence[Source], read: Callable[[Source], bytes | OSError], ahead: int) -> None:
        self._paths, self._read, self._ahead = iter(paths), read, ahead
        self._pool = ThreadPoolExecutor(ahead, thread_name_prefix="fer-read") if ahead else None
        self._started: deque[tuple[Source, asyncio.Future[bytes | OSError]]] = deque()

    def __aiter__(self) -> _Reads[Source]:
        return self

    async def __anext__(self) -> tuple[Source, bytes | OSError]:
        if self._pool is None:
            path = next(self._paths, _END)
            if path is _END:
                raise StopAsyncIteration
            return path, self._read(path)
        loop = asyncio.get_running_loop()
        while len(self._started) < self._ahead and (path := next(self._paths, _END)) is not _END:
            self._started.append((path, loop.run_in_executor(self._pool, self._read, path)))
        if not self._started:
            raise StopAsyncIteration
        path, future = self._started.popleft()
        return path, await future

    def close(self) -> None:
        for _, future in self._started:
            future.cancel()
        self._started.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_END: Any = object()


async def _error(exc: Exception) -> ImageAnswer | Exception:
    return exc


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
