"""Offered load far beyond capacity: 200 or 503 with Retry-After, never a timeout or another 5xx.

How long the accepted requests take under this load is a measurement, not a test:
benchmarks/http.py reports it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import SHIPPED_CHECKPOINT
from tests.images import face_png
from tests.server import app_serving, post

CLIENTS = 400
REQUESTS_PER_CLIENT = 3
ANSWER_DEADLINE_S = 120  # keeps a stuck server from hanging the suite; not a latency bound


async def client(port: int, request: bytes, results: list[tuple[int, bool, bytes]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(REQUESTS_PER_CLIENT):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=ANSWER_DEADLINE_S)
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:] if ":" in line
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            results.append((status, "retry-after" in headers, body))
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.slow
def test_overload_gets_200_or_503_and_recovers() -> None:
    with app_serving(checkpoint=SHIPPED_CHECKPOINT, queue_size=64) as server:
        body = face_png()
        request = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        results: list[tuple[int, bool, bytes]] = []

        async def flood() -> None:
            await asyncio.gather(*(client(server.port, request, results) for _ in range(CLIENTS)))

        asyncio.run(flood())
        after = post(f"{server.url}/predict", content=body, headers={"content-type": "image/png"})
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT  # every request answered
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 503}, statuses
    refused = [(has_retry, body) for status, has_retry, body in results if status == 503]
    assert all(has_retry and b"retry in a moment" in body for has_retry, body in refused), refused[:3]
    assert 200 in statuses, "nothing was served"
    assert after.status_code == 200  # recovers at once
    assert "Traceback" not in server.log()  # read once the server has stopped: every line is in
