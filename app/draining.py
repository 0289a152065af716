"""Draining before the shutdown, so that a balancer stops sending before the listener closes.

On SIGTERM, uvicorn closes its listener at once and then lets what is in flight finish
(`FER_GRACEFUL_SHUTDOWN_S`). A balancer that still routes to the replica finds the port closed
and must retry elsewhere, and one that learns of the shutdown only from failed connects does so
late. So the service first drains: for `FER_DRAIN_S` it answers `GET /ready` with 503 while it
serves every request, new ones included, as before; the balancer's health check sees the 503 and
takes the replica out of rotation; only then does uvicorn's own graceful shutdown begin.

SIGINT (Ctrl+C at a terminal) skips the drain, and a second SIGTERM ends it early.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)


class Drain:
    """Whether the service is draining: /ready answers 503 from the moment it starts."""

    def __init__(self) -> None:
        self.started = False


class DrainingServer(uvicorn.Server):
    """uvicorn's server that drains for `drain_s` on the first SIGTERM before shutting down."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_s = drain_s
        self._drain_ends: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and not self.drain.started:
            # Runs as a signal handler between two bytecodes of the event loop's thread: set the
            # flag and the deadline only; on_tick, on the loop, starts the shutdown when it is due.
            self.drain.started = True
            self._drain_ends = time.monotonic() + self.drain_s
            logger.info("SIGTERM: draining for %g s (/ready answers 503, requests are still served)", self.drain_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_ends is not None and not self.should_exit and time.monotonic() >= self._drain_ends:
            logger.info("drained: closing the listener; requests in flight may finish")
            super().handle_exit(signal.SIGTERM, None)  # uvicorn's own shutdown, and its exit status
        return await super().on_tick(counter)
