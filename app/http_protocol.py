"""Connection-level limits that uvicorn does not set: how big and how slow a request's head may be,
and how many pipelined requests a connection may queue.

uvicorn's httptools protocol buffers a request line and headers without limit and waits for
them forever: a client that sends `GET /` and then streams bytes never ends its head, and its
buffer grows with what it sends; its keep-alive timer is reset by every byte, so a byte a second
keeps a connection open indefinitely. `GuardedHttpToolsProtocol` counts the bytes of each
request's head and gives it a deadline from the moment the connection is idle; past either, the
connection gets a JSON 431 (too large) or 408 (too slow) and is closed. A client that pipelines
requests without reading the answers queues them in the protocol: past `max_pipelined` the
connection is closed. A request answered before its body has arrived (a 422 for its query, a 503
when busy) has the rest of its body read and dropped, as uvicorn does, within `head_timeout_s`;
those bytes are not the next request's head, so they never earn the same request a second
answer (431 or 408). Past the deadline, or past `max_drain_bytes` (the upload limit), the
connection is closed without one; so is one that pauses longer than uvicorn's keep-alive
(armed by the answer, stopped by each read).

`server_options(settings)` is the one place where the service's uvicorn options are set, for
`python -m app` and the in-process test server alike.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import HeadersTooLarge, HeadersTooSlow, status_for
from app.settings import Settings


class ParsingStopped(Exception):
    """Raised from the parser's callback to stop parsing a connection that was just closed."""


def _raw_error(exc: Exception) -> bytes:
    """A whole HTTP/1.1 error response with the table's status and a JSON detail, closing the connection."""
    body = json.dumps({"detail": str(exc)}).encode()
    status = status_for(exc)
    reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a deadline for each request's head."""

    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0
    max_pipelined = 32
    # An answered request's unread body is dropped up to this many bytes; past them, the connection is closed.
    max_drain_bytes = 10 * 1024 * 1024
    # A client that stops reading its answers: once the write buffer is full, it has this long
    # to read before the connection is aborted (its task, fd and connection slot freed).
    write_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        # The current request's body is still arriving (its head is parsed, its end is not).
        self._reading_body = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drained_bytes = 0
        self._dropped = False
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head:
            self._refuse(
                HeadersTooSlow(f"the request line and headers did not arrive within {self.head_timeout_s:g} s")
            )

    def _refuse(self, exc: Exception) -> None:
        if not self.transport.is_closing():
            self.transport.write(_raw_error(exc))
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def data_received(self, data: bytes) -> None:
        if self._dropped:
            return  # the rest of what a dropped connection sent is not parsed
        if self._awaiting_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._dropped:  # our own stop, raised from on_headers_complete: no warning, no 400
                return
            msg = "Invalid HTTP request received."  # uvicorn's own handling, as in its data_received
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no WebSocket here (ws="none")
            return
        # Counted before parsing, checked after: a head that completes in this chunk is bounded
        # by the chunk; one that does not has sent more than the limit without ending.
        if self._awaiting_head and self._head_bytes > self.max_head_bytes:
            self._refuse(HeadersTooLarge(f"the request line and headers are over {self.max_head_bytes:,} bytes"))

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._reading_body = True
        self._unset_keepalive_if_required()  # a request behind a drained body, in the same read: not idle
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if len(self.pipeline) > self.max_pipelined:
            # Requests piling up unanswered: a client that does not read. Their memory goes with
            # the connection, and raising stops the parser from parsing the rest of what it sent
            # (2,000 pipelined heads in one read cost the event loop a second otherwise).
            self._dropped = True
            self.transport.abort()  # what it sent is dropped, and it is not reading what we send
            raise ParsingStopped

    def on_body(self, body: bytes) -> None:
        if self._drain_timer is not None:  # an answered request's body: counted, then dropped by uvicorn
            self._drained_bytes += len(body)
            if self._drained_bytes > self.max_drain_bytes:  # more than any body the service takes
                self._dropped = True
                self.transport.close()
                raise ParsingStopped
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading_body = False
        super().on_message_complete()
        if self._drain_timer is not None:  # an answered request's body, now all read and dropped
            self._drain_timer.cancel()
            self._drain_timer = None
            if not self.pipeline and not self.transport.is_closing():
                # Idle as after any answer: uvicorn's keep-alive closes it quietly (the body's bytes had
                # stopped that timer), before the head deadline would answer a 408 nobody asked for.
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
            self._await_head_if_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        answered_early = self._reading_body and self.cycle is not None and self.cycle.response_complete
        if answered_early and not self.transport.is_closing():
            # Answered before its body ended (not a pipelined request's body arriving behind another's
            # answer): the rest is read and dropped (uvicorn's on_body), up to a deadline.
            self._drain_timer = self.loop.call_later(self.head_timeout_s, self.transport.close)
            self._drained_bytes = 0
            return
        self._await_head_if_idle()

    def _await_head_if_idle(self) -> None:
        # Idle only if no queued request was just started (the parser's latest cycle is done):
        # a running request's body bytes are not a head, and its run time is not a head's wait.
        idle = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
        if idle and not self.transport.is_closing():
            self._awaiting_head = True
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = self._drain_timer = None
        super().connection_lost(exc)


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with the settings' limits."""
    return type(
        "ServiceHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_head_bytes": settings.max_header_bytes,
            "head_timeout_s": settings.header_timeout_s,
            "max_pipelined": settings.max_pipelined,
            "max_drain_bytes": settings.max_upload_bytes,
        },
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the service (everything but the app, the host and the port)."""
    return {
        "http": guarded_protocol(settings),
        "ws": "none",
        "log_level": settings.log_level,
        "access_log": False,  # RequestGuard writes one line per request with the id and batch size
        "timeout_graceful_shutdown": int(settings.graceful_shutdown_s),
        # Connections and requests at once; beyond it uvicorn answers 503 and closes.
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
    }
