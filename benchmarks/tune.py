"""Tune the micro-batching defaults: the service at concurrency 1 and 32 under each setting.

Sweeps FER_MAX_WAIT_MS, FER_THREADS and FER_MAX_BATCH one at a time around the defaults, serving
a 48×48 JPEG (multipart) to `benchmarks.loadgen` in its own process, and prints requests/s, p50
and p99 per point. The defaults in `app/settings.py` are the ones this table supports.

    python -m benchmarks.tune --json benchmarks/results/tune.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.settings import Settings
from benchmarks.http import BOUNDARY, free_port, measure, multipart, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48

ROOT = Path(__file__).resolve().parent.parent


def sweep_points() -> list[dict[str, str]]:
    """The defaults, then each knob varied alone."""
    defaults = Settings()
    base = {
        "max_wait_ms": f"{defaults.engine.max_wait_ms:g}",
        "threads": str(defaults.engine.threads),
        "max_batch": str(defaults.engine.max_batch),
    }
    variants = [
        {"max_wait_ms": "1"},
        {"max_wait_ms": "2"},
        {"max_wait_ms": "5"},
        {"threads": "1" if defaults.engine.threads != 1 else "2"},
        {"max_batch": "8"},
        {"max_batch": "64"},
    ]
    return [base] + [{**base, **variant} for variant in variants if {**base, **variant} != base]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "models" / "checkpoint.pth", help="checkpoint to serve"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per point")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    body = Path(tempfile.mkdtemp(prefix="fer-tune-")) / "face"
    body.write_bytes(multipart("file", [face_jpeg_48()]))
    workload = [("predict 48x48", "/predict", body, f"multipart/form-data; boundary={BOUNDARY}")]
    rows: list[dict[str, Any]] = []
    for point in sweep_points():
        port = free_port()
        env = {
            **os.environ,
            "FER_CHECKPOINT": str(args.checkpoint),
            "FER_LOG_LEVEL": "warning",
            "FER_PORT": str(port),
            **{f"FER_{key.upper()}": value for key, value in point.items()},
        }
        label = " ".join(f"{key}={value}" for key, value in point.items())
        server, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
        try:
            for row in measure(label, server, port, workload, args.duration, concurrencies=(1, 32)):
                rows.append({**row, "settings": point})
        finally:
            server.terminate()
            server.wait()
    write_results(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
