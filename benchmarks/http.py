"""The service end to end over loopback, side by side with the naive baseline, in one run.

Starts `python -m app` and `benchmarks.naive_app` in subprocesses, drives each with
`benchmarks.loadgen` in another process (bounded in time and count), and records requests/s,
p50/p95/p99 latency, the server's CPU use and peak RSS, and the cold start to /ready.

    python -m benchmarks.http --json benchmarks/results/http.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48, photo_jpeg_640

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "fer-bench-boundary"
CONCURRENCY = (1, 8, 32, 128)


def multipart(field: str, blobs: list[bytes]) -> bytes:
    parts = []
    for index, blob in enumerate(blobs):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{index}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + blob
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, peak RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu_s, peak


def start_server(
    command: list[str], env: dict[str, str], port: int, ready_path: str
) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1) as response:
                if response.status == 200:
                    return process, time.perf_counter() - started
        except OSError:
            time.sleep(0.02)


def batch_totals(port: int) -> tuple[float, float]:
    """(sum, count) of the service's batch-size histogram; (0, 0) for a server without one."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/prometheus", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0, 0.0
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("fer_batch_size_")
    }
    return values.get("fer_batch_size_sum", 0.0), values.get("fer_batch_size_count", 0.0)


def load(port: int, path: str, body: Path, content_type: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "benchmarks.loadgen", "--port", str(port), "--path", path, "--body-file", str(body),
        "--content-type", content_type, "-c", str(concurrency), "--duration", str(duration_s), "--max-requests", "50000",
    ]  # fmt: skip
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=duration_s + 120)
    result: dict[str, Any] = json.loads(output.stdout)
    return result


def measure(
    name: str,
    process: subprocess.Popen[bytes],
    port: int,
    workloads: list[tuple[str, str, Path, str]],
    duration_s: float,
    concurrencies: tuple[int, ...] = CONCURRENCY,
) -> list[dict[str, Any]]:
    rows = []
    for workload, path, body, content_type in workloads:
        load(port, path, body, content_type, 4, 1.0)  # warm-up
        for concurrency in concurrencies:
            cpu_before, _ = proc_stat(process.pid)
            sum_before, count_before = batch_totals(port)
            result = load(port, path, body, content_type, concurrency, duration_s)
            cpu_after, peak_rss = proc_stat(process.pid)
            sum_after, count_after = batch_totals(port)
            # Each face served observes the size of the batch it rode in: this is the mean batch a face saw.
            result["mean_batch"] = (
                (sum_after - sum_before) / (count_after - count_before) if count_after > count_before else None
            )
            result.update(
                server=name, workload=workload,
                server_cpu_cores=(cpu_after - cpu_before) / result["seconds"], peak_rss_mb=peak_rss / 2**20,
            )  # fmt: skip
            errors = sum(count for status, count in result["statuses"].items() if status != "200")
            result["errors"] = errors
            print(
                f"{name:<8} {workload:<21} c={concurrency:<4} {result['requests_per_s']:>7.1f} req/s  "
                f"p50 {result['p50_ms']:>7.1f}  p95 {result['p95_ms']:>7.1f}  p99 {result['p99_ms']:>7.1f} ms  "
                f"cpu {result['server_cpu_cores']:.2f}  rss {result['peak_rss_mb']:.0f} MB  errors {errors}  "
                f"batch {result['mean_batch'] or 0:.1f}",
                flush=True,
            )
            rows.append(result)
    return rows


def server_torch(python: str) -> str:
    """The torch version the servers run under (the CUDA and CPU wheels differ in memory)."""
    command = [python, "-c", "import torch; print(torch.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "models" / "checkpoint.pth", help="checkpoint to serve"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per point")
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="interpreter that runs both servers, e.g. a venv with the CPU-only torch wheel",
    )
    parser.add_argument(
        "--only",
        default="",
        help="measure only the workloads whose name contains this, e.g. 'batch' (the naive baseline is skipped "
        "when none of its workloads match)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    print(f"servers run torch {server_torch(args.server_python)} ({args.server_python})")
    workdir = Path(tempfile.mkdtemp(prefix="fer-bench-"))
    face, photo = face_jpeg_48(), photo_jpeg_640()
    bodies = {
        "face": multipart("file", [face]),
        "photo": multipart("file", [photo]),
        "batch32": multipart("files", [face] * 32),
    }
    for key, body in bodies.items():
        (workdir / key).write_bytes(body)
    (workdir / "face.jpg").write_bytes(face)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    service_workloads = [
        ("predict 48x48", "/predict", workdir / "face", content_type),
        ("predict 640x480", "/predict", workdir / "photo", content_type),
        ("batch of 32", "/predict/batch", workdir / "batch32", content_type),
        # The same face as a raw image/jpeg body: what multipart parsing costs.
        ("predict 48x48 raw", "/predict", workdir / "face.jpg", "image/jpeg"),
        # Ten-crop asked for per request: ten views per face, the accuracy mode (docs/tta.md).
        ("predict 48x48 tencrop", "/predict?tta=tencrop", workdir / "face", content_type),
    ]
    service_workloads = [workload for workload in service_workloads if args.only in workload[0]]
    if not service_workloads:
        parser.error(f"--only {args.only!r} matches no workload")
    # The naive app has no /predict/batch and takes multipart only.
    naive_workloads = [
        workload for workload in service_workloads if workload[0] in ("predict 48x48", "predict 640x480")
    ]
    env = {**os.environ, "FER_CHECKPOINT": str(args.checkpoint), "FER_LOG_LEVEL": "warning"}
    rows: list[dict[str, Any]] = []
    port = free_port()
    service, cold_start_s = start_server(
        [args.server_python, "-m", "app"], {**env, "FER_PORT": str(port)}, port, "/ready"
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        service_precision = json.loads(response.read())["served_precision"]
    print(f"service cold start to /ready: {cold_start_s:.2f} s, serving in {service_precision}")
    try:
        rows += measure("service", service, port, service_workloads, args.duration)
    finally:
        service.terminate()
        service.wait()
    naive_start_s = None
    if naive_workloads:
        port = free_port()
        naive_command = [
            args.server_python, "-m", "uvicorn", "benchmarks.naive_app:app", "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
        naive, naive_start_s = start_server(naive_command, env, port, "/docs")
        try:
            rows += measure("naive", naive, port, naive_workloads, args.duration)
        finally:
            naive.terminate()
            naive.wait()
    write_results(
        args.json,
        server_torch=server_torch(args.server_python),
        cold_start_s=cold_start_s,
        service_precision=service_precision,
        naive_cold_start_s=naive_start_s,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
