"""Training images/s on this CPU, without and with `training.speed`, in one run.

Each side is a fresh child process (the allocator setting is per process) that trains one epoch
through `training.loop.train`, the path `python -m training.train` takes: the recipe's batch
size, augmentation and precision, on `--images` of FER2013 train (from the decode cache; random
faces when the data is absent). The default is a whole epoch of FER2013 train, 224 batches of
128; a shorter one charges each side's one-off start (oneDNN's kernels, the allocator's first
buffers) to fewer steps, which lowers the faster side's figure more (40 batches: 1.97× where a
whole epoch gives 2.13×, docs/training.md). The figure is the loop's own
`train_images_per_second`; both sides alternate `--rounds` times and the median is reported.

`--profile` says where a step's time goes instead: each side trains `--images` (default 40
batches) under torch's profiler, and the convolutions' share (forward and backward, with the
forward's GFLOP/s) is printed beside the step. A rewrite that leaves the convolutions as they
are cannot beat the before side's step divided by the after side's convolution time, so that
bound is printed too: it is why the speed-up differs between CPUs (docs/training.md).

python -m benchmarks.train_speed --recipe default --json benchmarks/results/train_speed.json
python -m benchmarks.train_speed --profile
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


def one_epoch(recipe: str, is_fast: bool, images: int, val_images: int = 256) -> float:
    """Train one epoch of `images` in this process; its images/s."""
    config = replace(RECIPES[recipe], epochs=1, warmup_epochs=0, init_from="", cpu_speedups=is_fast)
    if is_fast:
        keep_freed_memory()  # as the training.train CLI does
    split = training_split(images)
    val = Split(split.pixels[:val_images], split.labels[:val_images], split.classes, split.paths[:val_images])
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(config, split, val, Path(run_dir))
    return float(result.history[0]["train_images_per_second"])


PROFILED_STEPS = 40


def conv_profile(recipe: str, is_fast: bool, images: int) -> dict[str, float]:
    """ms per step (an epoch of `images`), then its convolutions' ms and forward GFLOP/s (a second, profiled one).

    The profiler slows the many small operations around the convolutions (the before side's step
    by a third), so the step is timed without it. The profiled epoch stops at `PROFILED_STEPS`
    batches: the profiler keeps every event, and a whole epoch's outgrew 24 GiB.
    """
    from torch.profiler import ProfilerActivity, profile

    rate = one_epoch(recipe, is_fast, images)
    batch = RECIPES[recipe].batch_size
    steps = min(images // batch, PROFILED_STEPS)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        one_epoch(recipe, is_fast, steps * batch, val_images=8)  # a token val split: its forward is not a step's
    forward_ms, backward_ms, forward_flops = 0.0, 0.0, 0.0
    for event in profiler.events():
        if event.name == "aten::mkldnn_convolution":
            forward_ms += event.self_cpu_time_total / 1000
            (n, _, h, w), (k, c, kh, kw) = event.input_shapes[0], event.input_shapes[1]
            forward_flops += 2.0 * n * k * c * kh * kw * h * w  # stride 1, "same" padding: output h × w
        elif event.name == "aten::convolution_backward":
            backward_ms += event.self_cpu_time_total / 1000
    return {
        "step_ms": 1000 * batch / rate,
        "conv_forward_ms": forward_ms / steps,
        "conv_backward_ms": backward_ms / steps,
        "conv_forward_gflops": forward_flops / forward_ms / 1e6 if forward_ms else 0.0,
    }


def print_profiles(recipe: str, images: int) -> dict[str, dict[str, float]]:
    """Profile both sides in child processes; print each step's split and the bound it sets."""
    profiles = {}
    for side in ("before", "after"):
        command = [sys.executable, "-m", "benchmarks.train_speed", "--recipe", recipe, "--images", str(images)]
        output = subprocess.run([*command, "--child", side, "--profile"], check=True, capture_output=True, text=True)
        profiles[side] = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"recipe {recipe}, batch {RECIPES[recipe].batch_size}, {images} images profiled a side")
    for side, figures in profiles.items():
        conv = figures["conv_forward_ms"] + figures["conv_backward_ms"]
        print(
            f"{side:6s} step {figures['step_ms']:6.1f} ms: convolutions {conv:6.1f} ms "
            f"({100 * conv / figures['step_ms']:.0f}%; forward {figures['conv_forward_ms']:.1f} ms at "
            f"{figures['conv_forward_gflops']:.0f} GFLOP/s, backward {figures['conv_backward_ms']:.1f} ms), "
            f"the rest {figures['step_ms'] - conv:.1f} ms"
        )
    after_conv = profiles["after"]["conv_forward_ms"] + profiles["after"]["conv_backward_ms"]
    print(f"bound on the speed-up with these convolutions: {profiles['before']['step_ms'] / after_conv:.2f}x")
    return profiles


def main() -> int:
    """Alternate the two sides in child processes and print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="training images per measured epoch (default: FER2013 train's; 40 batches with --profile)",
    )
    parser.add_argument("--profile", action="store_true", help="where a step's time goes, not images/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.images is None:
        args.images = RECIPES[args.recipe].batch_size * (40 if args.profile else 224)
    if args.child:
        measure = conv_profile if args.profile else one_epoch
        print(json.dumps(measure(args.recipe, args.child == "after", args.images)))
        return 0
    print(machine_line())
    if args.profile:
        write_results(
            args.json, recipe=args.recipe, images=args.images, profiles=print_profiles(args.recipe, args.images)
        )
        return 0
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
