"""Views through the network in one pass or in chunks of `FORWARD_CHUNK`: faces/s per TTA mode.

python -m benchmarks.chunk

Ten-crop turns a batch of 32 faces into 320 views; the forward pass slows beyond batch 32
(benchmarks/results/infer.json), so the predictor splits the views into chunks. This measures
that choice on the machine at hand, alternating the two settings for a few rounds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import models.predictor as predictor_module
from benchmarks.machine import machine_line
from benchmarks.tta import faces_per_second
from models.checkpoint import load_checkpoint
from models.predictor import Predictor
from models.tta import TTA_MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to measure")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per call")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="as the service runs")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    faces = torch.randn(args.batch_size, 1, 48, 48).clamp(-1, 1)
    chunked = predictor_module.FORWARD_CHUNK
    print(machine_line() + f", batch {args.batch_size}")
    print(f"{'round':<6} {'views':<14} {'tta':<8} {'faces/s':>8}")
    try:
        for round_number in range(args.rounds):
            for chunk, name in ((10**9, "one pass"), (chunked, f"chunks of {chunked}")):
                predictor_module.FORWARD_CHUNK = chunk
                for mode in TTA_MODES:
                    predictor = Predictor(checkpoint, precision=args.precision, tta=mode)
                    speed = faces_per_second(predictor, faces, args.batch_size, rounds=10 if mode == "tencrop" else 30)
                    print(f"{round_number:<6} {name:<14} {mode:<8} {speed:>8.0f}")
    finally:
        predictor_module.FORWARD_CHUNK = chunked
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
