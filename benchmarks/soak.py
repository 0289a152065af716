"""Soak: hold the service at about 80% of its measured capacity and watch for leaks.

Measures capacity with a short closed-loop run at 32 clients, then sends requests at 80% of
that rate (open loop, a fixed schedule) for --minutes, sampling the server's RSS, open file
descriptors and threads every 10 s. Passes with zero errors, RSS growth under 10% and no growth
in open files or threads.

    python -m benchmarks.soak --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.http import BOUNDARY, free_port, load, multipart, start_server
from benchmarks.loadgen import build_request
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48

CONNECTIONS = 64


def sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":", 1)[1].split()[0] for line in status if line.split(":", 1)[-1].strip()}
    return {
        "rss_mb": int(fields["VmRSS"]) / 1024,
        "threads": int(fields["Threads"]),
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def open_loop(port: int, request: bytes, rate_per_s: float, seconds: float, pid: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    samples: list[dict[str, float]] = []
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def one() -> None:
        try:
            # A fixed pool of keep-alive connections, like a real client's: when all are busy the
            # request waits here, and that wait counts in its latency.
            reader, writer = await pool.get()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
            length = next(
                (int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0
            )
            await reader.readexactly(length)
            status = head.split(b" ", 2)[1].decode()
            pool.put_nowait((reader, writer))
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            status = type(exc).__name__
        statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    tasks = []
    sent = 0
    next_sample = started
    while (now := time.perf_counter()) - started < seconds:
        while sent < (now - started) * rate_per_s:
            tasks.append(asyncio.create_task(one()))
            sent += 1
        if now >= next_sample:
            samples.append({"t_s": now - started, **sample(pid)})
            next_sample += 10
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)
    samples.append({"t_s": time.perf_counter() - started, **sample(pid)})
    return {"sent": sent, "statuses": statuses, "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to hold the load")
    parser.add_argument("--fraction", type=float, default=0.8, help="share of the measured capacity to offer")
    parser.add_argument("--json", type=Path, default=None, help="write the samples here")
    args = parser.parse_args()
    print(machine_line())
    body = multipart("file", [face_jpeg_48()])
    body_file = Path(os.environ.get("TMPDIR", "/tmp")) / "fer-soak-body"
    body_file.write_bytes(body)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    port = free_port()
    env = {**os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning"}
    server, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    try:
        capacity = load(port, "/predict", body_file, content_type, 32, 5.0)["requests_per_s"]
        rate = capacity * args.fraction
        print(
            f"capacity {capacity:.0f} req/s at 32 clients; soaking at {rate:.0f} req/s for {args.minutes:g} min",
            flush=True,
        )
        request = build_request("127.0.0.1", port, "/predict", body, content_type)
        result = asyncio.run(open_loop(port, request, rate, args.minutes * 60, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)
    # Threads and sockets come and go with the load (the thread pool grows and shrinks), so single
    # samples mislead: a leak is a ceiling that keeps rising. Compare the maxima of the first and
    # last thirds after a one-minute warm-up; RSS compares the mean of the same windows.
    warm = [s for s in result["samples"] if s["t_s"] >= min(60.0, args.minutes * 30)] or result["samples"]
    third = max(1, len(warm) // 3)
    early, late = warm[:third], warm[-third:]

    def ceiling(window: list[dict[str, float]], key: str) -> float:
        return max(sample[key] for sample in window)

    def mean(window: list[dict[str, float]], key: str) -> float:
        return sum(sample[key] for sample in window) / len(window)

    errors = sum(count for status, count in result["statuses"].items() if status != "200")
    growth = mean(late, "rss_mb") / mean(early, "rss_mb") - 1
    verdict = (
        errors == 0
        and growth < 0.10
        and ceiling(late, "open_files") <= ceiling(early, "open_files")
        and ceiling(late, "threads") <= ceiling(early, "threads")
    )
    print(f"sent {result['sent']}, statuses {result['statuses']}")
    print(
        f"RSS mean {mean(early, 'rss_mb'):.0f} → {mean(late, 'rss_mb'):.0f} MB ({growth:+.1%}), open files max "
        f"{ceiling(early, 'open_files'):.0f} → {ceiling(late, 'open_files'):.0f}, threads max "
        f"{ceiling(early, 'threads'):.0f} → {ceiling(late, 'threads'):.0f}: {'PASS' if verdict else 'FAIL'}"
    )
    write_results(args.json, capacity_rps=capacity, rate_rps=rate, **result)
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
