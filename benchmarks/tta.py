"""Test-time augmentation: what each mode the service offers (FER_TTA) buys on val, and what it costs.

python -m benchmarks.tta --checkpoint models/checkpoint.pth
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.machine import machine_line
from models.checkpoint import load_checkpoint
from models.predictor import Predictor
from models.preprocessing import to_model_input
from models.tta import TTA_MODES
from training.data import default_data_dir, load_split
from training.evaluate import evaluate_predictor


def faces_per_second(predictor: Predictor, inputs: torch.Tensor, batch_size: int, rounds: int = 20) -> float:
    """Faces through `predict_tensors` per second at `batch_size`, after a warm-up pass."""
    batch = inputs[:batch_size]
    predictor.predict_tensors(batch)
    started = time.perf_counter()
    for _ in range(rounds):
        predictor.predict_tensors(batch)
    return rounds * batch_size / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to measure")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset root (default: $FER2013_DIR)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per forward pass for the speed column")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="as the service runs")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    split = load_split((args.data_dir or default_data_dir()) / "val", checkpoint.preprocessing)
    inputs = to_model_input(torch.from_numpy(split.pixels), checkpoint.preprocessing)
    print(machine_line() + f", batch {args.batch_size}, {len(split)} val images")
    print(f"{'tta':<8} {'accuracy':>8} {'macro-F1':>8} {'loss':>7} {'faces/s':>8}")
    for mode in TTA_MODES:
        predictor = Predictor(checkpoint, precision=args.precision, tta=mode)
        metrics = evaluate_predictor(predictor, split)
        speed = faces_per_second(predictor, inputs, args.batch_size)
        print(
            f"{mode:<8} {metrics['accuracy']:>8.4f} {metrics['macro_f1']:>8.4f} {metrics['loss']:>7.4f} {speed:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
