"""bf16 autocast vs fp32 on the full val split: probability drift, label agreement, accuracy, speed.

python -m benchmarks.precision --checkpoint models/checkpoint.pth
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_line
from models.precision import cpu_supports_bf16
from models.predictor import Predictor
from models.preprocessing import to_model_input
from training.data import default_data_dir, load_split


def probabilities(predictor: Predictor, inputs: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    predictor.predict_tensors(inputs[:batch_size])  # warm-up
    started = time.perf_counter()
    chunks = [predictor.predict_tensors(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(chunks), len(inputs) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to measure")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset root (default: $FER2013_DIR)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--emulated", action="store_true", help="compare even where the CPU only emulates bf16 (slow, and not served)"
    )
    args = parser.parse_args()
    print(machine_line() + f", batch {args.batch_size}")
    if not cpu_supports_bf16() and not args.emulated:
        print(
            "skipped: this CPU has no AVX-512 BF16 or AMX, so the service runs fp32 here (--emulated compares anyway)"
        )
        return 0
    fp32 = Predictor.from_checkpoint(args.checkpoint, precision="fp32")
    bf16 = Predictor.from_checkpoint(args.checkpoint, precision="bf16")
    split = load_split((args.data_dir or default_data_dir()) / "val", fp32.checkpoint.preprocessing)
    inputs = to_model_input(torch.from_numpy(split.pixels), fp32.checkpoint.preprocessing)
    p32, speed32 = probabilities(fp32, inputs, args.batch_size)
    p16, speed16 = probabilities(bf16, inputs, args.batch_size)
    drift = np.abs(p32 - p16)
    agree = float((p32.argmax(1) == p16.argmax(1)).mean())
    acc32 = float((p32.argmax(1) == split.labels).mean())
    acc16 = float((p16.argmax(1) == split.labels).mean())
    print(f"val images: {len(split)}")
    print(
        f"max |p_bf16 - p_fp32|: {drift.max():.4f}  mean: {drift.mean():.5f}  99.9th pct: {np.quantile(drift.max(1), 0.999):.4f}"
    )
    print(f"label agreement: {agree:.4%}")
    print(f"accuracy fp32 {acc32:.4f}  bf16 {acc16:.4f}  difference {100 * (acc16 - acc32):+.2f} points")
    print(f"images/s fp32 {speed32:.0f}  bf16 {speed16:.0f}  ({speed16 / speed32:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
