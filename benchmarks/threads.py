"""How to share the cores between decoding, face detection and the forward pass, measured.

Starts the service once per combination of torch threads (FER_THREADS), prepare workers
(FER_PREPARE_WORKERS) and the detector's threads (FER_DETECTOR_THREADS), and drives it at 8 clients with a
kdef-dev photo and a 48×48 face crop, one after the other.

python -m benchmarks.threads --kdef ../shared/datasets/kdef-dev --json benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.http import BOUNDARY, free_port, measure, multipart, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48


def main() -> int:
    """Measure every combination and print one line per point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdef", type=Path, default=Path(os.environ.get("KDEF_DIR", "../shared/datasets/kdef-dev")))
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per point")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    workdir = Path(tempfile.mkdtemp(prefix="fer-threads-"))
    photo = next(iter(sorted(args.kdef.glob("*/*.JPG"))))
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    workloads = []
    for name, blob in (("kdef photo", photo.read_bytes()), ("face crop 48x48", face_jpeg_48())):
        path = workdir / name.replace(" ", "_")
        path.write_bytes(multipart("file", [blob]))
        workloads.append((name, "/predict", path, content_type))
    rows: list[dict[str, Any]] = []
    for torch_threads, workers, detector_threads in itertools.product((1, 2), (1, 2), (1, 2)):
        label = f"torch {torch_threads} prepare {workers} detector {detector_threads}"
        port = free_port()
        env = {
            **os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning", "FER_THREADS": str(torch_threads),
            "FER_PREPARE_WORKERS": str(workers), "FER_DETECTOR_THREADS": str(detector_threads),
        }  # fmt: skip
        process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
        try:
            for row in measure(label, process, port, workloads, args.duration, concurrencies=(8,)):
                rows.append(
                    {
                        **row,
                        "torch_threads": torch_threads,
                        "prepare_workers": workers,
                        "detector_threads": detector_threads,
                    }
                )
        finally:
            process.terminate()
            process.wait()
    write_results(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
