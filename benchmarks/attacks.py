"""Replay the hostile-client attacks against one server and measure what ordinary users see.

Starts `python -m app` on loopback. For each attack, runs it from threads for a few seconds
while an ordinary client sends a 48×48 face crop again and again (its latency, p50 and p99) and
an ordinary photo every half second (its slowest answer and its statuses); samples the server's
RSS throughout, and counts its open file descriptors two seconds after the attack stops. Then
checks the server is ready, and SIGTERMs a second server under load: how long it takes to exit
and what every in-flight request got.

python -m benchmarks.attacks [--seconds 6] [--only TEXT] [--json benchmarks/results/attacks.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.http import free_port, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from tests.images import mjpeg_avi, plain_jpeg, tiff_directory_last


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scan_bomb(scans: int = 10_000) -> bytes:
    """A 6000×6000 progressive JPEG whose last scan is repeated `scans` times."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buffer, "JPEG", quality=50, progressive=True)
    data = buffer.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return data[:end] + data[last:end] * scans + data[end:]


def big_png() -> bytes:
    """A 36-megapixel PNG of a smooth pattern: a few hundred KB, 108 MB decoded."""
    yy, xx = np.mgrid[0:6000, 0:6000]
    pattern = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pattern).save(buffer, "PNG")
    return buffer.getvalue()


class Attack:
    """Threads that run `one(stop)` each until `stop` is set."""

    def __init__(self, name: str, copies: int, one: Callable[[threading.Event], None]) -> None:
        self.name, self.copies, self.one = name, copies, one
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self.copies):
            thread = threading.Thread(target=self._guarded, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _guarded(self) -> None:
        while not self.stop.is_set():
            try:
                self.one(self.stop)
            except (OSError, httpx.HTTPError):
                time.sleep(0.05)  # refused or cut off: try again, as an attacker would

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def attacks(port: int) -> list[Attack]:
    url = f"http://127.0.0.1:{port}"
    bomb, png = scan_bomb(), big_png()
    photo_5mb = np.random.default_rng(0).integers(0, 256, (1200, 1400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo_5mb).save(buffer, "PNG")
    noisy = buffer.getvalue()

    def post(data: bytes, path: str = "/predict") -> Callable[[threading.Event], None]:
        def one(stop: threading.Event) -> None:
            httpx.post(url + path, files={"file": ("x", data)}, timeout=120)

        return one

    def endless_line(stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /")
            while not stop.is_set():
                sock.sendall(b"a" * 4096)
                time.sleep(0.01)

    def silent(stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            stop.wait(timeout=30)
            sock.close()

    def header_drip(stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(timeout=1.0):
                sock.sendall(b"X")

    def body_drip(stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            )
            while not stop.wait(timeout=0.5):
                sock.sendall(b"x")

    def non_reader(stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            stop.wait(timeout=30)

    def batch_of_big_pngs(stop: threading.Event) -> None:
        httpx.post(url + "/predict/batch", files=[("files", ("b.png", png))] * 20, timeout=120)

    # Issue 28's media: what a file declares against what it makes the decoder do.
    growing = mjpeg_avi([plain_jpeg(16, 16)] + [plain_jpeg(8192, 8192)] * 30, declared=(16, 16), fps=1_000_000)
    huge_frames = mjpeg_avi([plain_jpeg(16000, 16000)] * 2, declared=(16000, 16000), fps=25)
    dense = mjpeg_avi([plain_jpeg(6000, 6000, 60)] * 33, declared=(6000, 6000), fps=240)  # inside every limit
    late_tiff = tiff_directory_last(6600, 6000)  # 39.6 megapixels, its size written after the pixels

    def video(data: bytes, leave_after_s: float | None = None) -> Callable[[threading.Event], None]:
        def one(stop: threading.Event) -> None:
            headers = {"content-type": "video/x-msvideo"}
            if leave_after_s is None:
                httpx.post(url + "/predict/video", content=data, headers=headers, timeout=120)
                return
            with contextlib.suppress(httpx.TimeoutException):  # the client leaves: the server should stop
                httpx.post(url + "/predict/video", content=data, headers=headers, timeout=leave_after_s)

        return one

    def batch_of_late_tiffs(stop: threading.Event) -> None:
        httpx.post(url + "/predict/batch", files=[("files", ("t.tif", late_tiff))] * 32, timeout=120)

    return [
        Attack("2 scan bombs (10,000 scans, 6000×6000)", 2, post(bomb)),
        Attack("40 clients uploading 5 MB photos", 40, post(noisy)),
        Attack("a batch of 20 × 36-megapixel PNGs, 2 clients", 2, batch_of_big_pngs),
        Attack("2 endless request lines", 2, endless_line),
        Attack("300 silent connections", 300, silent),
        Attack("100 heads dripping a byte a second", 100, header_drip),
        Attack("5 bodies dripping a byte every 0.5 s", 5, body_drip),
        Attack("20 clients pipelining without reading", 20, non_reader),
        Attack("2 videos declaring 16×16, then 8192×8192 frames 1 µs apart", 2, video(growing)),
        Attack("2 videos of two 16000×16000 frames", 2, video(huge_frames)),
        Attack("2 videos of 33 × 6000×6000 frames at 240 fps (inside every limit)", 2, video(dense)),
        Attack("the same 2 videos, clients leaving after 1 s", 2, video(dense, leave_after_s=1.0)),
        Attack("12 clients sending 40-MP TIFFs whose size comes last", 12, post(late_tiff)),
        Attack("2 clients: batches of 32 such TIFFs", 2, batch_of_late_tiffs),
    ]


def ordinary(port: int, seconds: float, pid: int) -> dict[str, Any]:
    """A face-crop client and a photo client for `seconds`; the server's peak RSS meanwhile."""
    url = f"http://127.0.0.1:{port}/predict"
    face, photo = face_jpeg_48(), photo_jpeg_640()
    face_ms: list[float] = []
    face_statuses: dict[int, int] = {}
    photo_ms: list[float] = []
    photo_statuses: dict[int, int] = {}
    end = time.monotonic() + seconds
    peak = rss_mb(pid)

    def client_loop(name: str, blob: bytes, ms: list[float], statuses: dict[int, int], pause_s: float) -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < end:
                started = time.perf_counter()
                status = client.post(url, files={"file": (name, blob)}).status_code
                ms.append((time.perf_counter() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
                time.sleep(pause_s)

    with ThreadPoolExecutor(2) as pool:
        running = [
            pool.submit(client_loop, "f.jpg", face, face_ms, face_statuses, 0.0),
            pool.submit(client_loop, "p.jpg", photo, photo_ms, photo_statuses, 0.5),
        ]
        while not all(future.done() for future in running):
            peak = max(peak, rss_mb(pid))
            time.sleep(0.1)
        for future in running:
            future.result()
    return {
        "face_p50_ms": statistics.median(face_ms),
        "face_p99_ms": float(np.percentile(face_ms, 99)),
        "face_statuses": face_statuses,
        "photo_max_ms": max(photo_ms),
        "photo_p99_ms": float(np.percentile(photo_ms, 99)),
        "photo_statuses": photo_statuses,
        "rss_peak_mb": peak,
    }


def sigterm_under_load(seconds: float) -> dict[str, Any]:
    """SIGTERM a server while 8 clients send photos and faces: exit time, and what each request got."""
    port = free_port()
    env = {**os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning", "FER_GRACEFUL_SHUTDOWN_S": "20"}
    process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    url = f"http://127.0.0.1:{port}/predict"
    bodies = [face_jpeg_48(), photo_jpeg_640()]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=60) as session:
            while not stop.is_set():
                try:
                    response = session.post(url, files={"file": ("x.jpg", bodies[index % 2])})
                    kind = str(response.status_code)
                    if response.status_code != 200:
                        kind += (
                            " json"
                            if response.headers.get("content-type", "").startswith("application/json")
                            else " text"
                        )
                except httpx.HTTPError:
                    kind = "connection refused or closed (after the listener closed)"
                    stop.wait(0.05)
                with lock:
                    outcomes[kind] = outcomes.get(kind, 0) + 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    exit_s = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    return {"exit_s": exit_s, "exit_code": code, "outcomes": outcomes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each attack runs")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--only", default="", help="run only the attacks whose name contains this text")
    args = parser.parse_args()
    print(machine_line())
    port = free_port()
    env = {**os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning"}
    process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    rows = []
    try:
        quiet = ordinary(port, args.seconds, process.pid)
        rest_rss, rest_fds = rss_mb(process.pid), open_fds(process.pid)
        print(
            f"at rest: face p50 {quiet['face_p50_ms']:.1f} ms p99 {quiet['face_p99_ms']:.1f} ms, RSS {rest_rss} MiB, {rest_fds} fds"
        )
        header = "| attack | face p50 ms | face p99 ms | face statuses | photo p99 ms | photo statuses | RSS before / peak / after MiB | fds after | CPU s in the 2 s after |"
        print(header)
        print("| --- | ---: | ---: | --- | ---: | --- | --- | ---: | ---: |")
        for attack in [attack for attack in attacks(port) if args.only in attack.name]:
            before = rss_mb(process.pid)
            attack.start()
            seen = ordinary(port, args.seconds, process.pid)
            attack.finish()
            cpu_before = cpu_seconds(process.pid)
            time.sleep(2)
            cpu_after_s = cpu_seconds(process.pid) - cpu_before  # still decoding for clients that left?
            row = {
                "attack": attack.name,
                **seen,
                "rss_before_mb": before,
                "rss_after_mb": rss_mb(process.pid),
                "fds_after": open_fds(process.pid),
                "cpu_s_in_2s_after": cpu_after_s,
            }
            rows.append(row)
            statuses = ", ".join(f"{count}× {status}" for status, count in sorted(row["photo_statuses"].items()))
            faces = ", ".join(f"{count}× {status}" for status, count in sorted(row["face_statuses"].items()))
            print(
                f"| {attack.name} | {row['face_p50_ms']:.1f} | {row['face_p99_ms']:.1f} | {faces} | {row['photo_p99_ms']:.0f} | {statuses} | "
                f"{before} / {row['rss_peak_mb']} / {row['rss_after_mb']} | {row['fds_after']} | {cpu_after_s:.2f} |",
                flush=True,
            )
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).status_code
        final_rss, final_fds = rss_mb(process.pid), open_fds(process.pid)
        print(
            f"after every attack: /ready {ready}, RSS {final_rss} MiB ({final_rss / rest_rss:.0%} of rest), {final_fds} fds (rest {rest_fds})"
        )
    finally:
        process.terminate()
        process.wait()
    shutdown = sigterm_under_load(args.seconds)
    print(
        f"SIGTERM under load: exited in {shutdown['exit_s']:.1f} s with {shutdown['exit_code']}; requests: {shutdown['outcomes']}"
    )
    write_results(args.json, at_rest=quiet, rows=rows, ready=ready, final_rss_mb=final_rss, rest_rss_mb=rest_rss,
                  final_fds=final_fds, rest_fds=rest_fds, shutdown=shutdown)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
