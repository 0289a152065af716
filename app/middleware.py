"""One pure-ASGI middleware around every request: id, upload limit, stall timeout, log line, metrics.

Pure ASGI rather than BaseHTTPMiddleware: it can refuse an oversized body from its
Content-Length before reading a byte, count a chunked body as it streams, and costs less.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ShuttingDown, UploadStalled, UploadTooLarge, error_response
from app.telemetry import Telemetry
from models.heap_release import release_memory

logger = logging.getLogger("app.access")

# After a request body this large, freed memory is handed back to the system (models/heap_release.py).
LARGE_BODY_BYTES = 1024 * 1024
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def printable(text: str) -> str:
    """`text` with control characters escaped: a path with %0d%0a must not write a fake log line."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def _too_large(limit: int, what: str = "image") -> UploadTooLarge:
    how = "shorten or recompress it" if what == "video" else "downscale or recompress it"
    return UploadTooLarge(f"the upload is larger than {limit:,} bytes: send a smaller {what} ({how})")


class InFlight:
    """How many requests are inside the app now: /metrics/prometheus reports it, the lifespan waits for it."""

    def __init__(self) -> None:
        self.count = 0


class RequestGuard:
    """Wraps the app: request ids, byte limit, body timeout, one access-log line, Prometheus counts."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_upload_bytes: int,
        upload_limits: Mapping[str, int] | None = None,
        body_timeout_s: float,
        body_deadline_s: float,
        telemetry: Telemetry,
        route_of: Callable[[str], str],
        in_flight: InFlight,
    ) -> None:
        self.app = app
        self.in_flight = in_flight
        self._last_trim = 0.0
        self.max_upload_bytes = max_upload_bytes
        # Paths with a byte limit of their own (the video route's), instead of max_upload_bytes.
        self.upload_limits = dict(upload_limits or {})
        self.body_timeout_s = body_timeout_s
        self.body_deadline_s = body_deadline_s
        self.telemetry = telemetry
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if _SAFE_REQUEST_ID.match(given_id) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        self.in_flight.count += 1
        received_bytes = [0]
        path = scope.get("path", "")
        limit = self.upload_limits.get(path, self.max_upload_bytes)
        what = "video" if path in self.upload_limits else "image"
        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                # Refused before reading a byte; the unread body cannot be skipped safely, so close.
                refusal = error_response(_too_large(limit, what), headers={"connection": "close"})
                await refusal(scope, receive, send_with_id)
                return
            await self.app(scope, self._guarded_receive(receive, received_bytes, limit, what), send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when the graceful-shutdown window ends
            # (it cancels nothing else: a client that leaves gets http.disconnect). Answer them
            # with a JSON 503 the client can retry elsewhere, not uvicorn's plain-text 500 and a
            # traceback; the task ends right after, so the cancellation is not needed further.
            if not started_response:
                refusal = error_response(
                    ShuttingDown("the service is shutting down: retry, another replica will answer")
                )
                await refusal(scope, receive, send_with_id)
        finally:
            if received_bytes[0] >= LARGE_BODY_BYTES:
                self._trim_soon()  # the body's buffers and spooled parts are freed by now
            self.in_flight.count -= 1
            elapsed_s = time.perf_counter() - started
            route = self.route_of(scope.get("path", ""))
            self.telemetry.requests.labels(route, str(status)).inc()
            client = state.get("client")
            if client is not None:  # the probes and the page are not a client's
                self.telemetry.client_requests.labels(client, str(status)).inc()
            self.telemetry.latency.labels(route).observe(elapsed_s)
            if isinstance(state.get("batch_size"), int) and state["batch_size"] > 0:
                self.telemetry.batch_size.observe(state["batch_size"])
            logger.info(
                "%s %s %d %.1fms batch=%s tta=%s client=%s id=%s",
                scope.get("method"), printable(scope.get("path", "")), status, elapsed_s * 1000, state.get("batch_size", "-"),
                state.get("tta", "-"), state.get("client", "-"), request_id,
            )  # fmt: skip

    def _trim_soon(self) -> None:
        """Hand freed memory back on a worker thread, at most once a second (it walks every arena)."""
        now = time.monotonic()
        if now - self._last_trim < 1.0:
            return
        self._last_trim = now
        asyncio.get_running_loop().run_in_executor(None, release_memory)

    def _guarded_receive(self, receive: Receive, received_bytes: list[int], limit: int, what: str) -> Receive:
        received = 0
        body_done = False
        # Each read has `body_timeout_s`, and the whole body `body_deadline_s`: a body that drips a
        # byte just inside the first would otherwise hold its worker indefinitely.
        deadline = time.monotonic() + self.body_deadline_s

        async def guarded() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that lands
                # as the read completes (models/pixel_admission.py).
                async with asyncio.timeout(min(self.body_timeout_s, max(0.0, remaining))):
                    message = await receive()
            except TimeoutError:
                if remaining <= self.body_timeout_s:
                    raise UploadStalled(
                        f"the upload took longer than {self.body_deadline_s:g} s: send it over a faster link, or a smaller image"
                    ) from None
                raise UploadStalled(
                    f"the upload stalled for {self.body_timeout_s:g} s: send the whole body without pausing"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                received_bytes[0] = received
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise _too_large(limit, what)
            return message

        return guarded
