"""Pixel admission: how much decoding may wait for the prepare threads, counted per request.

Each photo is admitted with the pixels it will decode (from its header). A request whose photo
would take the pixels of other requests' photos on or waiting for the prepare threads past
`max_pending_pixels` is refused at once (503), so a flood of big images cannot queue unbounded
work; a request's own images never refuse it, and one image up to the pixel limit is always
admitted when nothing else is being decoded.

A batch upload's images wait for room instead, up to a deadline, in arrival order. Without
more, an image larger than the budget would get in only when nothing else is decoded, which
under steady photo traffic is never: so the waiter at the head of the line reserves its pixels,
photos that arrive meanwhile see the reservation and are refused, the decodes in flight finish,
and the batch's image gets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

from models.errors import QueueFullError


@dataclass(eq=False)
class _Waiter:
    owner: object
    pixels: int


class PixelAdmission:
    """Pixels to decode of the photos on or waiting for the prepare threads, per request."""

    def __init__(self, max_pending_pixels: int) -> None:
        self.max_pending_pixels = max_pending_pixels
        self._lock = threading.Lock()
        self._pending: dict[object, int] = {}
        self._line: deque[_Waiter] = deque()
        self._wakeups: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}

    def admit_now(self, owner: object, pixels: int) -> None:
        """Admit `pixels` for `owner` at once, or raise `QueueFullError` naming what is being decoded."""
        with self._lock:
            others = self._others(owner, include_reservation=True)
            if not self._fits(owner, pixels, others):
                raise QueueFullError(f"the service is decoding {others:,} pixels of other uploads: retry in a moment")
            self._take(owner, pixels)

    async def admit_waiting(self, owner: object, pixels: int, deadline: float) -> None:
        """Admit `pixels` for `owner`, waiting in line for room until `deadline` (event-loop time).

        Raises:
            QueueFullError: the deadline passed first.
        """
        loop = asyncio.get_running_loop()
        wakeup = self._wakeups.setdefault(loop, asyncio.Event())
        waiter = _Waiter(owner, pixels)
        with self._lock:
            self._line.append(waiter)
        try:
            while True:
                wakeup.clear()
                with self._lock:
                    if self._line[0] is waiter and self._fits(owner, pixels, self._others(owner)):
                        self._line.popleft()
                        self._take(owner, pixels)
                        return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueFullError(
                        f"the service had no room to decode this image's {pixels:,} pixels before the deadline "
                        "(other uploads were being decoded): retry in a moment, or send smaller images"
                    )
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
                # wake-up and an outside cancel (Ctrl-C in `fer predict`) land together, and the
                # cancel is lost; timeout() tells its own cancel from the caller's.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await wakeup.wait()
        finally:
            with self._lock:
                if waiter in self._line:
                    self._line.remove(waiter)
            self._wake_all()  # the head of the line may have changed

    def release(self, owner: object, pixels: int) -> None:
        """`owner`'s `pixels` are decoded (or will never be): room for others. Safe from any thread."""
        with self._lock:
            left = self._pending.pop(owner, 0) - pixels
            if left > 0:
                self._pending[owner] = left
            waiting = bool(self._line)
        if waiting:  # no trip through the event loop when nobody waits (photo traffic alone)
            self._wake_all()

    def _others(self, owner: object, *, include_reservation: bool = False) -> int:
        """Pixels of other requests being decoded, and the head waiter's reservation if asked (lock held)."""
        others = sum(self._pending.values()) - self._pending.get(owner, 0)  # a few requests: summed when asked
        if include_reservation and self._line and self._line[0].owner is not owner:
            others += self._line[0].pixels
        return others

    def _fits(self, owner: object, pixels: int, others: int) -> bool:
        return not others or others + self._pending.get(owner, 0) + pixels <= self.max_pending_pixels

    def _take(self, owner: object, pixels: int) -> None:
        self._pending[owner] = self._pending.get(owner, 0) + pixels

    def _wake_all(self) -> None:
        for loop, wakeup in list(self._wakeups.items()):
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the loop is closed (a CLI or a test ran it before): forget it
                self._wakeups.pop(loop, None)
