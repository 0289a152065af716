"""A closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending the same request
back to back, bounded in time and count. Run as its own process; prints one JSON line.

    python -m benchmarks.loadgen --port 8000 --path /predict --body-file face.bin --content-type ... -c 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import uvloop


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[str, bool]:
    """Send one request on a keep-alive connection and read its answer: (status, the server closes)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status, b"connection: close" in head.lower()


async def _one_connection(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    budget: list[int],
    latencies: list[float],
    statuses: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            status, closes = await exchange(reader, writer, request)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if closes:
                break
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


async def run(
    host: str, port: int, request: bytes, concurrency: int, duration_s: float, max_requests: int
) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    budget = [max_requests]
    started = time.perf_counter()
    deadline = started + duration_s
    await asyncio.gather(
        *(_one_connection(host, port, request, deadline, budget, latencies, statuses) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "statuses": statuses,
    }


def build_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="server address (loopback only)")
    parser.add_argument("--port", type=int, required=True, help="server port")
    parser.add_argument("--path", default="/predict", help="route to POST to")
    parser.add_argument("--body-file", type=Path, required=True, help="the request body")
    parser.add_argument("--content-type", required=True, help="the body's Content-Type")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="connections, each one request at a time")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    args = parser.parse_args()
    request = build_request(args.host, args.port, args.path, args.body_file.read_bytes(), args.content_type)
    # uvloop (installed with uvicorn[standard]) spends less CPU per request than asyncio's own loop;
    # the generator shares the 2 cores with the server under test, so its own cost matters.
    result = uvloop.run(run(args.host, args.port, request, args.concurrency, args.duration, args.max_requests))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
