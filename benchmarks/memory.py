"""Does the service give memory back after large images? RSS at rest, at peak and after.

Starts `python -m app`, warms it with ordinary photos, then sends 12 uploads of a 36-megapixel
PNG (a few hundred KB, 108 MB decoded) from 4 clients at once, sampling the server's RSS.

python -m benchmarks.memory
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.http import free_port, start_server
from benchmarks.machine import machine_line
from benchmarks.workloads import ASTRONAUT


def rss_mb(pid: int) -> int:
    """The process's resident set, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def large_png(side: int = 6000) -> bytes:
    """A smooth side×side RGB pattern: small as a PNG, side² × 3 bytes decoded."""
    yy, xx = np.mgrid[0:side, 0:side]
    pattern = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pattern).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> int:
    """Measure and print rest, peak and after."""
    print(machine_line())
    port = free_port()
    env = {**os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning"}
    process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    url = f"http://127.0.0.1:{port}/predict"
    try:
        photo = ASTRONAUT.read_bytes()
        for _ in range(20):
            httpx.post(url, files={"file": ("a.jpg", photo)}, timeout=60)
        rest = rss_mb(process.pid)
        big = large_png()
        peak = rest
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url, files={"file": ("b.png", big)}, timeout=120) for _ in range(12)]
            while not all(future.done() for future in futures):
                peak = max(peak, rss_mb(process.pid))
                time.sleep(0.05)
            statuses = [future.result().status_code for future in futures]
        time.sleep(1)
        after = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait()
    print(f"12 × 36-megapixel PNG from 4 clients: statuses {sorted(set(statuses))}")
    print(f"RSS at rest {rest} MiB, peak {peak} MiB, 1 s after {after} MiB ({after / rest:.0%} of rest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
