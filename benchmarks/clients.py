"""API keys and rate limits under load: what seven ordinary clients see while an eighth floods, and what a key check costs.

1. Starts `python -m app` with a keys file of eight clients and `FER_RATE_LIMIT`. Seven clients
   send a 48×48 face crop each, at a steady pace, for `--seconds`: their latency p50 and p99.
   Then the same seven again while the eighth floods from `--flood-threads` connections as fast
   as it is answered: the seven's p50/p99 again, and the flooder's statuses (its 429s).
2. The key check alone (`ApiKeys.client_of`), in process: a right and a wrong key, interleaved,
   `--tries` each; the median and the spread of each, and their difference.

python -m benchmarks.clients [--seconds 10] [--rate 20] [--tries 10000] [--json benchmarks/results/clients.json]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.clients import ApiKeys, add_key
from benchmarks.http import free_port, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48

ORDINARY = 7
PACE_S = 0.2  # an ordinary client's pause between requests: 5 a second each, under the limit


def ordinary_clients(url: str, keys: list[str], seconds: float) -> list[float]:
    """Latencies (ms) of the ordinary clients' requests over `seconds`; every answer must be 200."""
    face = face_jpeg_48()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(key: str) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            while time.monotonic() < end:
                started = time.perf_counter()
                status = client.post(url, files={"file": ("f.jpg", face)}).status_code
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                    statuses[status] = statuses.get(status, 0) + 1
                time.sleep(PACE_S)

    threads = [threading.Thread(target=run, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if set(statuses) != {200}:
        print(f"ordinary clients got {statuses}", file=sys.stderr)
    return latencies


def flood(url: str, key: str, threads: int, stop: threading.Event) -> dict[int, int]:
    """One client's key from `threads` connections, as fast as answers come: its statuses."""
    face = face_jpeg_48()
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            while not stop.is_set():
                status = client.post(url, files={"file": ("f.jpg", face)}).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait()
    for worker in workers:
        worker.join()
    return statuses


def key_check_timing(tries: int) -> dict[str, float]:
    """Nanoseconds per `client_of` for a right and a wrong key (interleaved in random order, so drift and caches hit both alike)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keys"
        right = add_key(path, "client-0")
        for index in range(1, 8):
            add_key(path, f"client-{index}")
        keys = ApiKeys(path)
        wrong = right[:-4] + "AAAA"  # the same length, the same prefix: the case a timing attack needs
        times: dict[str, list[int]] = {"right": [], "wrong": []}
        order = random.Random(0)
        for _ in range(tries):
            pair = [("right", right), ("wrong", wrong)]
            order.shuffle(pair)  # which goes first varies: caches favour neither
            for name, key in pair:
                started = time.perf_counter_ns()
                keys.client_of(f"Bearer {key}")
                times[name].append(time.perf_counter_ns() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    # The noise: the standard error of the difference of the means, after dropping the slowest 1 %.
    trimmed = {name: np.sort(values)[: int(len(values) * 0.99)] for name, values in times.items()}
    error = float(np.sqrt(sum(values.var() / len(values) for values in trimmed.values())))
    return {
        "right_median_ns": medians["right"],
        "wrong_median_ns": medians["wrong"],
        "right_mean_ns": float(trimmed["right"].mean()),
        "wrong_mean_ns": float(trimmed["wrong"].mean()),
        "difference_of_means_ns": float(trimmed["wrong"].mean() - trimmed["right"].mean()),
        "standard_error_ns": error,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each phase runs")
    parser.add_argument("--rate", type=float, default=10.0, help="FER_RATE_LIMIT for the run")
    parser.add_argument("--burst", type=int, default=None, help="FER_RATE_BURST for the run (default: the rate)")
    parser.add_argument("--flood-threads", type=int, default=8, help="connections the flooding client uses")
    parser.add_argument("--tries", type=int, default=10_000, help="key checks of each kind")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as folder:
        keys_path = Path(folder) / "api-keys"
        keys = [add_key(keys_path, f"client-{index}") for index in range(ORDINARY + 1)]
        port = free_port()
        env = {
            **os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning", "FER_API_KEYS_FILE": str(keys_path),
            "FER_RATE_LIMIT": f"{args.rate:g}", "FER_RATE_BURST": str(args.burst or int(args.rate)),
        }  # fmt: skip
        process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
        url = f"http://127.0.0.1:{port}/predict"
        try:
            ordinary_clients(url, keys[:ORDINARY], 2.0)  # warm the connections and the allocator
            quiet = ordinary_clients(url, keys[:ORDINARY], args.seconds)
            stop = threading.Event()
            flooded: dict[str, Any] = {}
            flooder = threading.Thread(
                target=lambda: flooded.update(statuses=flood(url, keys[ORDINARY], args.flood_threads, stop))
            )
            flooder.start()
            time.sleep(1.0)  # the flood is on before the measurement starts
            loaded = ordinary_clients(url, keys[:ORDINARY], args.seconds)
            stop.set()
            flooder.join()
        finally:
            process.terminate()
            process.wait()
    figures: dict[str, Any] = {
        "rate_limit": args.rate,
        "rate_burst": args.burst or int(args.rate),
        "quiet_p50_ms": float(np.percentile(quiet, 50)),
        "quiet_p99_ms": float(np.percentile(quiet, 99)),
        "flooded_p50_ms": float(np.percentile(loaded, 50)),
        "flooded_p99_ms": float(np.percentile(loaded, 99)),
        "flooder_statuses": flooded.get("statuses", {}),
    }
    figures["p99_ratio"] = figures["flooded_p99_ms"] / figures["quiet_p99_ms"]
    print(
        f"7 clients, {1 / PACE_S:g} requests/s each, limit {args.rate:g}/s per client (bursts of "
        f"{figures['rate_burst']}): p50/p99 "
        f"{figures['quiet_p50_ms']:.1f}/{figures['quiet_p99_ms']:.1f} ms alone, "
        f"{figures['flooded_p50_ms']:.1f}/{figures['flooded_p99_ms']:.1f} ms beside a flooder "
        f"(p99 ×{figures['p99_ratio']:.2f}); the flooder got {figures['flooder_statuses']}"
    )
    timing = key_check_timing(args.tries)
    print(
        f"key check, {args.tries:,} tries each: right {timing['right_median_ns']:.0f} ns, wrong "
        f"{timing['wrong_median_ns']:.0f} ns (medians); difference of means {timing['difference_of_means_ns']:+.0f} ns "
        f"± {timing['standard_error_ns']:.0f} ns (one standard error)"
    )
    write_results(args.json, **figures, key_check=timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
