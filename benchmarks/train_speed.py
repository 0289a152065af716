"""Training images/s on this CPU, without and with `training.speed`, in one run.

Each side is a fresh child process (the allocator setting is per process) that trains one epoch
through `training.loop.train`, the path `python -m training.train` takes: the recipe's batch
size, augmentation and precision, on `--images` of FER2013 train (from the decode cache; random
faces when the data is absent). The default is a whole epoch of FER2013 train, 224 batches of
128; a shorter one charges each side's one-off start (oneDNN's kernels, the allocator's first
buffers) to fewer steps, which lowers the faster side's figure more (40 batches: 1.97× where a
whole epoch gives 2.13×, docs/training.md). The figure is the loop's own
`train_images_per_second`; both sides alternate `--rounds` times and the median is reported.

`--profile` says where a step's time goes instead: each side times an epoch of `--images`
(default 40 batches), then profiles one more, and every convolution's forward and backward time
and GFLOP/s are printed beside the step (medians of `--rounds`). A rewrite that leaves the after
side's convolutions as they are cannot beat the before side's step divided by their time, so that
bound is printed too: it is why the speed-up differs between CPUs (benchmarks/RESULTS.md §11).

python -m benchmarks.train_speed --recipe default --json benchmarks/results/train_speed.json
python -m benchmarks.train_speed --profile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch.profiler import ProfilerActivity, profile

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


# The profiled epoch stops here: the profiler keeps every event, and a whole epoch's outgrew 24 GiB.
PROFILED_STEPS = 40


def profile_convolutions(recipe: str, is_fast: bool, images: int) -> dict[str, Any]:
    """ms per step (an epoch of `images`), then each convolution's ms and GFLOP per step (a second, profiled epoch).

    The profiler slows the many small operations around the convolutions (the before side's step
    by a third), so the step is timed without it. A convolution's time is the self time of its
    oneDNN forward (`aten::mkldnn_convolution`) and backward (`aten::convolution_backward`); its
    work is counted from the shapes: two FLOPs per multiply-add, and the backward does one
    convolution's worth for the input's gradient (none for the network's input) and one for the weight's.
    """
    images_per_second = one_epoch(recipe, is_fast, images)
    batch = RECIPES[recipe].batch_size
    steps = min(images // batch, PROFILED_STEPS)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        one_epoch(recipe, is_fast, steps * batch, val_images=8)
    layers: dict[str, dict[str, float]] = {}
    for event in profiler.events():
        if event.name == "aten::mkldnn_convolution":
            (n, _, height, width), weight = event.input_shapes[0], event.input_shapes[1]
            padding, stride, dilation = event.concrete_inputs[3:6]
            out_height, out_width = (
                (size + 2 * pad - step * (kernel - 1) - 1) // move + 1
                for size, pad, step, kernel, move in zip(
                    (height, width), padding, dilation, weight[2:], stride, strict=True
                )
            )
            passes, side = 1, "forward"
        elif event.name == "aten::convolution_backward":
            (n, _, out_height, out_width), weight = event.input_shapes[0], event.input_shapes[2]
            output_mask = event.concrete_inputs[-1]  # (input, weight, bias) gradients wanted
            passes, side = int(output_mask[0]) + int(output_mask[1]), "backward"
        else:
            continue
        if n != batch:
            continue  # the token val split's forward
        multiply_adds = n * math.prod(weight) * out_height * out_width  # weight: (out, in / groups, kh, kw)
        layer = layers.setdefault("x".join(map(str, weight)), {})
        layer[f"{side}_ms"] = layer.get(f"{side}_ms", 0.0) + event.self_cpu_time_total / 1000 / steps
        layer[f"{side}_gflop"] = layer.get(f"{side}_gflop", 0.0) + 2e-9 * multiply_adds * passes / steps
    return {"step_ms": 1000 * batch / images_per_second, "layers": layers}


def alternate_children(recipe: str, images: int, rounds: int, *flags: str) -> dict[str, list[Any]]:
    """Each side's child process, alternating, `rounds` times: what each printed last (JSON), by side.

    A child that fails has its stderr shown before the error is raised.
    """
    results: dict[str, list[Any]] = {"before": [], "after": []}
    for _ in range(rounds):
        for side in results:
            command = [sys.executable, "-m", "benchmarks.train_speed", "--recipe", recipe, "--images", str(images)]
            child = subprocess.run([*command, "--child", side, *flags], capture_output=True, text=True)
            if child.returncode:
                sys.stderr.write(child.stderr)
                child.check_returncode()
            results[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    return results


def median_profile(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over `runs` of one side."""
    layers = {
        name: {key: statistics.median(run["layers"][name][key] for run in runs) for key in figures}
        for name, figures in runs[0]["layers"].items()
    }
    return {"step_ms": statistics.median(run["step_ms"] for run in runs), "layers": layers}


def print_profiles(recipe: str, images: int, rounds: int) -> dict[str, Any]:
    """Profile both sides, alternating, in child processes; print the medians' split and the bound they set."""
    runs = alternate_children(recipe, images, rounds, "--profile")
    medians = {side: median_profile(side_runs) for side, side_runs in runs.items()}
    print(f"recipe {recipe}, batch {RECIPES[recipe].batch_size}, {images} images timed a side, medians of {rounds}")
    for side, figures in medians.items():
        layers = figures["layers"].values()
        forward_ms, backward_ms = (sum(layer[f"{pass_}_ms"] for layer in layers) for pass_ in ("forward", "backward"))
        forward_gflop, backward_gflop = (
            sum(layer[f"{pass_}_gflop"] for layer in layers) for pass_ in ("forward", "backward")
        )
        conv_ms = forward_ms + backward_ms
        print(
            f"{side:6s} step {figures['step_ms']:6.1f} ms: convolutions {conv_ms:6.1f} ms "
            f"({100 * conv_ms / figures['step_ms']:.0f}%; forward {forward_ms:.1f} ms at "
            f"{forward_gflop / forward_ms * 1000:.0f} GFLOP/s, backward {backward_ms:.1f} ms at "
            f"{backward_gflop / backward_ms * 1000:.0f} GFLOP/s), the rest {figures['step_ms'] - conv_ms:.1f} ms"
        )
        for name, layer in figures["layers"].items():
            print(
                f"    weight {name:>12s}: forward {layer['forward_ms']:5.1f} ms "
                f"({layer['forward_gflop'] / layer['forward_ms'] * 1000:4.0f} GFLOP/s), backward "
                f"{layer['backward_ms']:5.1f} ms ({layer['backward_gflop'] / layer['backward_ms'] * 1000:4.0f} GFLOP/s)"
            )
    after_conv_ms = sum(layer["forward_ms"] + layer["backward_ms"] for layer in medians["after"]["layers"].values())
    bound = medians["before"]["step_ms"] / after_conv_ms
    print(f"bound on the speed-up with the after side's convolutions as they are: {bound:.2f}x")
    return {"medians": medians, "runs": runs, "bound": bound}


def main() -> int:
    """Alternate the two sides in child processes; print the medians and their ratio, or with --profile their split."""
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
        args.images = RECIPES[args.recipe].batch_size * (PROFILED_STEPS if args.profile else 224)
    if args.child:
        measure = profile_convolutions if args.profile else one_epoch
        print(json.dumps(measure(args.recipe, args.child == "after", args.images)))
        return 0
    print(machine_line())
    if args.profile:
        profiles = print_profiles(args.recipe, args.images, args.rounds)
        write_results(args.json, recipe=args.recipe, images=args.images, **profiles)
        return 0
    rates: dict[str, list[float]] = alternate_children(args.recipe, args.images, args.rounds)
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"recipe {args.recipe}, batch {RECIPES[args.recipe].batch_size}, {args.images} images an epoch")
    print(f"before (plain network, default allocator): {before:.0f} images/s  {[round(r) for r in rates['before']]}")
    print(f"after (training.speed):                    {after:.0f} images/s  {[round(r) for r in rates['after']]}")
    print(f"speed-up: {after / before:.2f}x")
    write_results(args.json, recipe=args.recipe, images=args.images, rates=rates, speedup=after / before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
