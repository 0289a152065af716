"""`fer predict` on Ray against local `fer predict`: images/s, start-up, peak memory.

python -m benchmarks.scale --json benchmarks/results/scale.json

Each run is the real command in a child process, as a user types it, on a folder of symbolic
links made here and deleted after (the data is never copied):
- crops: the first 20,000 FER2013 train crops (sorted paths), 48×48 JPEGs;
- photos: the first 800 kdef-dev photos, 562×762, each searched for its face.
Engines: local (`fer predict --format csv`, one process, every core), and Ray with 1 and 2
workers of one CPU each on a local cluster that the command starts and stops.
- wall: the command's whole time; start-up: the same command on one image; images/s: the set's
  images over wall − start-up (the steady rate), and over wall (what a user waits for).
- peak RSS: the largest sum of resident memory over the command's process tree, sampled every
  0.2 s (Ray's raylet, GCS, agents and workers are its children). Pages shared between processes
  are counted once per process, so for Ray it is an upper bound.
Precision is named (fp32) so that every engine runs the same forward pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_line, write_results

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {
    "local": [],
    "ray, 1 worker": ["--engine", "ray", "--workers", "1"],
    "ray, 2 workers": ["--engine", "ray", "--workers", "2"],
}


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and every process under it, in MiB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "status").read_text().splitlines()
        except OSError:
            continue
        values = dict(line.split(":", 1) for line in fields if ":" in line)
        parents[int(entry.name)] = int(values.get("PPid", "0").strip())
        rss[int(entry.name)] = int(values.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in values else 0
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    members, frontier = {root}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in members:
                members.add(child)
                frontier.append(child)
    return sum(rss.get(pid, 0) for pid in members) / 1024


def run(command: list[str], workdir: Path) -> tuple[float, float]:
    """(wall seconds, peak tree RSS MiB) of one `fer` command."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *command], cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(process.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')[-2000:]}")
    return wall, peak


def link_set(target: Path, files: list[Path]) -> Path:
    target.mkdir(parents=True)
    for index, path in enumerate(files):
        (target / f"{index:05d}-{path.parent.name}{path.suffix.lower()}").symlink_to(path)
    return target


def measure(name: str, folder: Path, one: Path, count: int, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    for engine, flags in ENGINES.items():
        outputs = []
        for label, source in (("one", one), ("all", folder)):
            output = workdir / f"{name}-{engine.replace(' ', '').replace(',', '-')}-{label}"
            output = output.with_suffix(".parquet" if flags else ".csv")
            outputs.append(output)
            fmt = [] if flags else ["--format", "csv"]
            wall, peak = run(
                ["predict", str(source), "--precision", "fp32", *fmt, *flags, "--output", str(output)], workdir
            )
            if label == "one":
                startup = wall
            else:
                row = {
                    "set": name,
                    "engine": engine,
                    "images": count,
                    "wall_s": round(wall, 2),
                    "startup_s": round(startup, 2),
                    # None where the set takes less than a second beyond start-up: too short to tell
                    "steady_images_per_s": round(count / (wall - startup), 1) if wall - startup > 1 else None,
                    "end_to_end_images_per_s": round(count / wall, 1),
                    "peak_rss_mb": round(peak),
                }
                print(
                    f"{name:7s} {engine:15s} {count:6d} images  wall {wall:6.1f} s  start-up {startup:5.1f} s  "
                    f"{row['steady_images_per_s'] or float('nan'):7.1f} img/s steady  {row['end_to_end_images_per_s']:7.1f} end to end  "
                    f"peak RSS {peak:6.0f} MiB",
                    flush=True,
                )
                rows.append(row)
        for output in outputs:
            shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--crops", type=int, default=20_000, help="FER2013 train crops")
    parser.add_argument("--photos", type=int, default=800, help="kdef-dev photos")
    args = parser.parse_args()
    fer2013 = Path(os.environ.get("FER2013_DIR", ROOT.parent / "shared/datasets/fer2013"))
    kdef = Path(os.environ.get("KDEF_DIR", ROOT.parent / "shared/datasets/kdef-dev"))
    import ray

    print(machine_line(), f"ray {ray.__version__}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fer-scale-") as temp:
        workdir = Path(temp)
        sets = []
        if (fer2013 / "train").is_dir():
            crops = sorted((fer2013 / "train").glob("*/*.jpg"))[: args.crops]
            sets.append(("crops", link_set(workdir / "crops", crops), len(crops)))
        if kdef.is_dir():
            photos = sorted(kdef.glob("*/*.JPG"))[: args.photos]
            sets.append(("photos", link_set(workdir / "photos", photos), len(photos)))
        if not sets:
            print("no FER2013_DIR or KDEF_DIR: nothing to measure", file=sys.stderr)
            return 2
        for name, folder, count in sets:
            one = next(iter(sorted(folder.iterdir())))
            rows += measure(name, folder, one, count, workdir)
    write_results(args.json, machine=machine_line(), ray=ray.__version__, runs=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
