"""Queue admission: waiting for room in the batching queue, for uploads that bring many faces at once.

A single image that finds the queue full gets 503 at once. A `/predict/batch` upload brings up
to `max_batch_files` faces: refusing the ones that do not fit would fail a request the service
can finish in a moment, so its faces wait for room, up to a deadline. Uploads take turns in
arrival order (an asyncio lock is first come, first served), so each one's faces go into the
queue together and the first upload finishes first, instead of every upload's faces
interleaving and all of them finishing late. The waiting is woken by the batcher's worker each
time it takes a batch off the queue: no polling, so a crowd of waiting uploads costs the event
loop nothing while the forward passes run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from models.errors import QueueFullError

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueRoom:
    """Turns and wake-ups for uploads waiting for room; lives on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._turn = asyncio.Lock()
        self._room = asyncio.Event()
        # True while an upload holds its turn: only then is a wake-up worth a trip through the
        # event loop, so /predict traffic alone costs the loop no extra wake-ups.
        self._submitting = False

    def notify_threadsafe(self) -> None:
        """Room was freed: called from the batcher's worker thread."""
        if self._submitting and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._room.set)

    async def submit_all(
        self, submit: Callable[[Item], Future[Result]], items: Sequence[Item], deadline: float
    ) -> list[Future[Result]]:
        """`submit` every item in order, waiting for room (and for this upload's turn) until `deadline`.

        `deadline` is in event-loop time. Raises `QueueFullError` when it passes first; the items
        already queued are then cancelled, so the service does not compute answers nobody reads.
        """
        futures: list[Future[Result]] = []
        try:
            async with asyncio.timeout_at(deadline), self._turn:
                # Raised before the first try, so no room freed after a failed try goes unannounced.
                self._submitting = True
                try:
                    for item in items:
                        while True:
                            # Clear before trying: a wake-up that arrives after a failed try is kept.
                            self._room.clear()
                            try:
                                futures.append(submit(item))
                                break
                            except QueueFullError:
                                await self._room.wait()
                finally:
                    self._submitting = False
        except BaseException as exc:
            # A deadline passed or the caller went away: what was queued is computed for nobody.
            for future in futures:
                future.cancel()
            if not isinstance(exc, TimeoutError):
                raise
            raise QueueFullError(
                f"the service is at capacity: this request's {len(items)} faces waited their turn for room in the "
                "queue until the deadline; retry in a moment, or send fewer images per request"
            ) from None
        return futures
