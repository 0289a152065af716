"""Files per second through `fer predict --engine ray` with one worker and with two, in one run.

python -m benchmarks.ray_workers --files 1000

Writes `--files` copies of a 640×480 JPEG with one face (and 48×48 crops, as many) into a
temporary folder, joins one local Ray cluster for the whole run (its start-up is not what is
measured), and times the command with `--workers 1` and `--workers 2` on each set, each into a new
output. A worker is one actor with `--cpus-per-worker` CPUs (default 1), as the command runs it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from cli.main import main as fer
from cli.scale import connect


def timed_run(folder: Path, output: Path, workers: int) -> float:
    """Seconds for `fer predict folder --engine ray --workers workers` on the joined cluster."""
    started = time.perf_counter()
    status = fer(["predict", str(folder), "--engine", "ray", "--workers", str(workers), "--output", str(output)])
    if status != 0:
        raise RuntimeError(f"fer predict exited with {status}")
    return time.perf_counter() - started


def main() -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_workers", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="files in each set")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="fer-ray-bench-"))
    sets = {"640x480 photos": photo_jpeg_640(), "48x48 crops": face_jpeg_48()}
    for name, data in sets.items():
        folder = work / name.replace(" ", "-")
        folder.mkdir()
        for index in range(args.files):
            (folder / f"{index:05d}.jpg").write_bytes(data)
    connect(None)
    figures: dict[str, dict[str, float]] = {}
    try:
        for name in sets:
            folder = work / name.replace(" ", "-")
            timed_run(folder, work / f"warm-{folder.name}.parquet", 1)  # actors' first model load, caches
            for workers in (1, 2):
                seconds = timed_run(folder, work / f"{folder.name}-{workers}.parquet", workers)
                figures.setdefault(name, {})[f"workers_{workers}"] = round(args.files / seconds, 1)
                print(f"{name}: {workers} worker(s): {args.files / seconds:.1f} files/s ({seconds:.1f} s)")
    finally:
        ray.shutdown()
    write_results(args.json, files=args.files, files_per_second=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
