"""Lean serving, measured: image sizes, time to ready, and the container's memory at rest and after 10,000 photos.

python -m benchmarks.lean --lean fer-service:lean --torch fer-service:torch

Builds nothing: the images come from `docker compose build` (the Dockerfile's `lean` target, and
`torch` for the other). For each image it reports its size; for the lean one it starts a
container, times `docker run` to the first 200 from /ready, reads the server process's RSS
(VmRSS of PID 1) at rest, sends `--photos` photos (640×480 JPEGs with one face, 8 at a time),
and reads the RSS again. Then it times `python -m app` from this checkout (what `make serve`
runs) to its first 200 from /ready, `--starts` times, and reports the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.http import free_port
from benchmarks.machine import machine_line
from benchmarks.workloads import photo_jpeg_640

ROOT = Path(__file__).resolve().parent.parent
NETWORK = "fer-lean-bench"


def image_size_mb(image: str) -> float:
    """The image's uncompressed size as `docker images` reports it, in MB (10^6 bytes)."""
    inspected = json.loads(subprocess.check_output(["docker", "image", "inspect", image]))
    return float(inspected[0]["Size"]) / 1e6


def wait_ready(url: str, deadline_s: float = 120.0) -> float:
    """Seconds until `url` answers 200 (polled every 10 ms)."""
    started = time.perf_counter()
    while time.perf_counter() - started < deadline_s:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{url} not ready within {deadline_s} s")


def container_rss_mib(name: str) -> float:
    """VmRSS of the container's PID 1 (the server), in MiB."""
    status = subprocess.check_output(["docker", "exec", name, "cat", "/proc/1/status"], text=True)
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def send_photos(url: str, count: int, clients: int) -> dict[str, int]:
    """`count` photos through /predict, `clients` at a time; status code → answers."""
    photo = photo_jpeg_640()
    statuses: dict[int, int] = {}

    def one(client: httpx.Client) -> int:
        return client.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")}).status_code

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(clients) as pool:
        for status in pool.map(lambda _: one(client), range(count)):
            statuses[status] = statuses.get(status, 0) + 1
    return {str(code): n for code, n in sorted(statuses.items())}


def measure_container(image: str, photos: int) -> dict[str, object]:
    """Start `image`, time it to ready, RSS at rest, `photos` photos, RSS after."""
    port, name = free_port(), f"fer-lean-bench-{os.getpid()}"
    # A network of its own, as compose makes: an engine started with --bridge=none (../shared/DOCKER.md)
    # publishes ports only for containers on a user-defined network.
    subprocess.run(["docker", "network", "create", NETWORK], capture_output=True)
    started = time.perf_counter()
    subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--network", NETWORK, "-p", f"127.0.0.1:{port}:8000",
         "--read-only", "--tmpfs", "/tmp", image],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{port}/ready")
        start_to_ready = time.perf_counter() - started
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").json()
        time.sleep(2)
        rest = container_rss_mib(name)
        statuses = send_photos(f"http://127.0.0.1:{port}/predict", photos, clients=8)
        time.sleep(2)
        after = container_rss_mib(name)
    finally:
        subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True)
    return {
        "image": image,
        "docker_run_to_ready_s": round(start_to_ready, 2),
        "polled_ready_s": round(ready_s, 2),
        "served": f"{metrics['served_precision']}/{metrics['served_runtime']}",
        "rss_at_rest_mib": round(rest, 1),
        "photos": photos,
        "statuses": statuses,
        "rss_after_photos_mib": round(after, 1),
    }


def make_serve_ready_s(starts: int) -> list[float]:
    """`python -m app` from this checkout (what `make serve` runs), start to first 200 from /ready."""
    times = []
    for _ in range(starts):
        port = free_port()
        env = {**os.environ, "FER_HOST": "127.0.0.1", "FER_PORT": str(port)}
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready")
            times.append(round(time.perf_counter() - started, 2))
        finally:
            process.terminate()
            process.wait(60)
    return times


def main() -> int:
    """Run the CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lean", description=__doc__.splitlines()[0])
    parser.add_argument("--lean", default="fer-service:lean", help="the lean image (Dockerfile target lean)")
    parser.add_argument("--torch", default=None, help="the torch image, for its size (Dockerfile target torch)")
    parser.add_argument("--photos", type=int, default=10_000, help="photos sent to the lean container")
    parser.add_argument("--starts", type=int, default=5, help="starts of `python -m app` to time")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    results: dict[str, object] = {"machine": machine_line()}
    sizes = {image: round(image_size_mb(image), 1) for image in (args.lean, args.torch) if image}
    results["image_size_mb"] = sizes
    print(f"image sizes (MB): {sizes}")
    container = measure_container(args.lean, args.photos)
    results["lean_container"] = container
    print(f"lean container: {container}")
    times = make_serve_ready_s(args.starts)
    results["make_serve_ready_s"] = {"runs": times, "median": statistics.median(times)}
    print(f"python -m app to ready: {times} s (median {statistics.median(times)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
