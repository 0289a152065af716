"""Giving freed memory back to the system after large images.

glibc keeps the memory of freed large buffers in its per-thread arenas: after a few 40-megapixel
decodes on the prepare threads the service's RSS stayed gigabytes above its resting level,
though nothing held it. `malloc_trim(0)` returns the free pages at the top of each arena and
unmaps the free ones in between. It is called after an image of at least `TRIM_AFTER_PIXELS`;
elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

# A 4-megapixel RGB decode is 12 MB: below this, trimming costs more than it gives back.
TRIM_AFTER_PIXELS = 4_000_000


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def release_memory_after(pixels: int) -> None:
    """Return free heap memory to the system when an image this large was just let go."""
    if pixels >= TRIM_AFTER_PIXELS:
        release_memory()


def release_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
