"""Training images/s on this CPU, without and with `training.speed`, in one run.

Each side is a fresh child process (the allocator setting is per process) that trains one epoch
through `training.loop.train`, the path `python -m training.train` takes: the recipe's batch
size, augmentation and precision, on `--images` of FER2013 train (from the decode cache; random
faces when the data is absent). The default is a whole epoch of FER2013 train, 224 batches of
128; a shorter one charges each side's one-off start (oneDNN's kernels, the allocator's first
buffers) to fewer steps, which lowers the faster side's figure more (40 batches: 1.97× where a
whole epoch gives 2.13×, docs/training.md). The figure is the loop's own
`train_images_per_second`; both sides alternate `--rounds` times and the median is reported.

python -m benchmarks.train_speed --recipe default --json benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_line, write_results
from models.checkpoint import CLASSES
from models.preprocessing import PreprocessingSpec
from training.config import RECIPES
from training.data import Split, default_data_dir, load_split
from training.loop import train
from training.speed import keep_freed_memory


def training_split(images: int) -> Split:
    """The first `images` of FER2013 train, or random faces of the same shape without the data."""
    try:
        split = load_split(default_data_dir() / "train", PreprocessingSpec(), cache_dir=Path(".cache/fer2013"))
        order = np.random.default_rng(0).permutation(len(split))[:images]
        return Split(split.pixels[order], split.labels[order], split.classes, tuple(split.paths[i] for i in order))
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (images, 48, 48), dtype=np.uint8)
        labels = rng.integers(0, len(CLASSES), images)
        return Split(pixels, labels, CLASSES, tuple(f"{i}.jpg" for i in range(images)))


def one_epoch(recipe: str, is_fast: bool, images: int) -> float:
    """Train one epoch of `images` in this process; its images/s."""
    config = replace(RECIPES[recipe], epochs=1, warmup_epochs=0, init_from="", cpu_speedups=is_fast)
    if is_fast:
        keep_freed_memory()  # as the training.train CLI does
    split = training_split(images)
    val = Split(split.pixels[:256], split.labels[:256], split.classes, split.paths[:256])
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(config, split, val, Path(run_dir))
    return float(result.history[0]["train_images_per_second"])


def main() -> int:
    """Alternate the two sides in child processes and print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument(
        "--images", type=int, default=128 * 224, help="training images per measured epoch (default: FER2013 train's)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_epoch(args.recipe, args.child == "after", args.images)))
        return 0
    print(machine_line())
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for side in rates:
            command = [sys.executable, "-m", "benchmarks.train_speed", "--recipe", args.recipe]
            command += ["--images", str(args.images), "--child", side]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rates[side].append(float(output.strip().splitlines()[-1]))
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"recipe {args.recipe}, batch {RECIPES[args.recipe].batch_size}, {args.images} images an epoch")
    print(f"before (plain network, default allocator): {before:.0f} images/s  {[round(r) for r in rates['before']]}")
    print(f"after (training.speed):                    {after:.0f} images/s  {[round(r) for r in rates['after']]}")
    print(f"speed-up: {after / before:.2f}x")
    write_results(args.json, recipe=args.recipe, images=args.images, rates=rates, speedup=after / before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
