"""Where the service's CPU goes per request, under load: exact CPU per thread, and py-spy's split.

Starts `python -m app`, drives `/predict` with a 48×48 JPEG at 32 clients from
`benchmarks.loadgen` (its own process), and meanwhile
- reads every thread's CPU time from /proc before and after the load (exact, includes the
  native threads of torch's intra-op pool that no Python profiler sees), and
- attaches `py-spy record` for the same window (root, or ptrace permission, is needed), whose
  samples of each Python thread are grouped by the innermost frame that names a known part
  (multipart parsing, decoding, the forward pass, …) to split that thread's exact CPU time.
Prints CPU milliseconds per request for each part.

    python -m benchmarks.profile --json benchmarks/results/profile.json
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.http import BOUNDARY, free_port, load, multipart, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48

ROOT = Path(__file__).resolve().parent.parent
RATE_HZ = 250

# (part, substrings of a frame's file path or function); the innermost matching frame decides.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("building the answer (probabilities → JSON)", ("to_predictions", "json/", "starlette/responses.py")),
    ("model forward pass", ("torch/", "onnxruntime/", "models/predictor.py", "models/network.py", "models/int8.py")),
    ("batcher hand-off (queue, futures)", ("models/batching.py", "concurrent/futures", "queue.py", "threading.py")),
    ("multipart parsing", ("python_multipart/", "starlette/formparsers.py", "tempfile.py", "app/uploads.py")),
    ("decode + preprocess", ("PIL/", "models/preprocessing.py", "models/faces.py", "models/engine.py", "cv2")),
    (
        "logging + metrics + guard",
        ("logging/", "prometheus_client/", "app/middleware.py", "app/telemetry.py", "uuid.py"),
    ),
    ("worker-thread hop (anyio)", ("anyio/", "starlette/concurrency.py")),
    ("FastAPI/Starlette routing, params, middleware", ("fastapi/", "starlette/", "pydantic", "contextlib.py")),
    (
        "HTTP server + event loop (uvicorn, uvloop, asyncio)",
        ("uvicorn/", "asyncio/", "uvloop", "httptools", "<frozen runpy>"),
    ),
]


# Innermost frames of a thread blocked in a wait: py-spy's --nonblocking sampling counts these as
# running, which gave the batcher's idle waits for work 36% of its CPU; they are dropped.
IDLE_FRAMES = ("Condition.wait (threading.py",)


def classify(frames: list[str]) -> str:
    """The part of the innermost frame that names one; 'other' when none does."""
    for frame in reversed(frames):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                return part
    return "other"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread of `pid`, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        result[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return result


def python_threads(raw: Path) -> dict[int, collections.Counter[str]]:
    """py-spy's raw output → samples per part, per native thread id."""
    threads: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_FRAMES):
            continue
        tid = int(frames[0].split("(", 1)[1].split(")", 1)[0], 0)  # "thread (1234): MainThread"
        threads[tid][classify(frames[1:])] += int(count)
    return threads


def split_cpu(cpu_by_thread: dict[int, float], samples: dict[int, collections.Counter[str]]) -> dict[str, float]:
    """Each thread's exact CPU seconds, split in the proportions of its py-spy samples.

    Threads py-spy never saw running Python are the native workers of torch's or ONNX Runtime's
    thread pools (or idle ones).
    """
    parts: collections.Counter[str] = collections.Counter()
    for tid, seconds in cpu_by_thread.items():
        counts = samples.get(tid)
        if not counts:
            parts["model forward pass (native threads of torch or ONNX Runtime)"] += seconds
            continue
        total = sum(counts.values())
        for part, n in counts.items():
            parts[part] += seconds * n / total
    return dict(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "models" / "checkpoint.pth", help="checkpoint to serve"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=32, help="clients")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install py-spy (it is in the project's dev extras)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="fer-profile-"))
    body = workdir / "face"
    body.write_bytes(multipart("file", [face_jpeg_48()]))
    raw = workdir / "samples.txt"
    port = free_port()
    env = {**os.environ, "FER_CHECKPOINT": str(args.checkpoint), "FER_LOG_LEVEL": "warning", "FER_PORT": str(port)}
    server, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    try:
        load(port, "/predict", body, content_type, 4, 1.0)  # warm-up
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", str(RATE_HZ), "--threads",
             "--nonblocking", "--duration", str(int(args.duration)), "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        before = thread_cpu(server.pid)
        result = load(port, "/predict", body, content_type, args.concurrency, args.duration)
        after = thread_cpu(server.pid)
        _, spy_errors = spy.communicate(timeout=60)
    finally:
        server.terminate()
        server.wait()
    if not raw.exists():
        print(f"py-spy recorded nothing (it needs root or ptrace permission): {spy_errors.strip()}")
        return 1
    cpu = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    requests = result["requests"]
    parts = split_cpu(cpu, python_threads(raw))
    total_ms = sum(parts.values()) * 1000 / requests
    rows = [
        {"part": part, "cpu_ms_per_request": seconds * 1000 / requests, "share": seconds * 1000 / requests / total_ms}
        for part, seconds in sorted(parts.items(), key=lambda item: -item[1])
    ]
    print(f"{requests} requests at {args.concurrency} clients, {result['requests_per_s']:.0f} req/s, "
          f"server CPU {total_ms:.2f} ms per request")  # fmt: skip
    print(f"{'part':<52} {'CPU ms/request':>15} {'share':>6}")
    for row in rows:
        print(f"{row['part']:<52} {row['cpu_ms_per_request']:>15.3f} {row['share']:>6.1%}")
    write_results(args.json, load=result, cpu_ms_per_request=total_ms, parts=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
