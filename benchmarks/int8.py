"""The int8 path against fp32 and bf16: forward faces/s at every batch size the service forms, and val accuracy.

python -m benchmarks.int8 --checkpoint models/checkpoint.pth

Each precision runs through `Predictor.predict_tensors` (no TTA), as the service runs it; the
speeds of the three paths are measured in turns in one process, best of `--rounds`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_flags, machine_line, write_results
from models.checkpoint import load_checkpoint
from models.precision import cpu_supports_bf16
from models.predictor import Predictor
from models.preprocessing import to_model_input
from training.data import default_data_dir, load_split

BATCHES = (1, 2, 4, 8, 16, 32)


def faces_per_second(predictor: Predictor, faces: torch.Tensor, seconds: float) -> float:
    predictor.predict_tensors(faces)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 5:
        predictor.predict_tensors(faces)
        runs += 1
    return runs * len(faces) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to measure")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset root (default: $FER2013_DIR)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per precision and batch size, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing; the best is kept")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    flags = cpu_flags()
    print(machine_line())
    print("cpu flags: " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx")))))
    checkpoint = load_checkpoint(args.checkpoint)
    threads = torch.get_num_threads()
    names = ["fp32", *(["bf16"] if cpu_supports_bf16() else []), "int8"]
    predictors = {name: Predictor(checkpoint, precision=name, tta="none") for name in names}  # type: ignore[arg-type]
    split = load_split((args.data_dir or default_data_dir()) / "val", checkpoint.preprocessing)
    faces = to_model_input(torch.from_numpy(split.pixels), checkpoint.preprocessing)

    best: dict[str, dict[int, float]] = {name: dict.fromkeys(BATCHES, 0.0) for name in names}
    for _ in range(args.rounds):
        for batch in BATCHES:
            for name in names:  # in turns, so drift in the machine's speed hits every path alike
                # As the engine serves int8: torch on one thread beside ONNX Runtime's (models/engine.py).
                torch.set_num_threads(1 if name == "int8" else threads)
                rate = faces_per_second(predictors[name], faces[:batch], args.seconds)
                best[name][batch] = max(best[name][batch], rate)
    torch.set_num_threads(threads)
    today = {batch: max(best[name][batch] for name in names if name != "int8") for batch in BATCHES}
    print(f"\nforward faces/s, no TTA, best of {args.rounds} rounds ({threads} threads)")
    print(f"{'batch':>5} " + " ".join(f"{name:>8}" for name in names) + "  int8 / best torch path")
    for batch in BATCHES:
        rates = " ".join(f"{best[name][batch]:>8.0f}" for name in names)
        print(f"{batch:>5} {rates}  {best['int8'][batch] / today[batch]:.2f}x")

    probabilities = {name: predictor.predict_tensors(faces) for name, predictor in predictors.items()}
    accuracy = {name: float((p.argmax(1) == split.labels).mean()) for name, p in probabilities.items()}
    write_results(args.json, faces_per_s=best, val_accuracy=accuracy)
    labels = split.labels
    print(f"\nval ({len(labels)} faces), no TTA")
    reference = probabilities["fp32"]
    for name in names:
        chosen = probabilities[name].argmax(1)
        accuracy = float((chosen == labels).mean())
        recalls = np.array([(chosen[labels == c] == c).mean() for c in range(len(split.classes))])
        fp32_recalls = np.array([(reference.argmax(1)[labels == c] == c).mean() for c in range(len(split.classes))])
        drift = np.abs(probabilities[name] - reference).max(axis=1)
        print(
            f"{name:>5}: accuracy {accuracy:.4f} ({100 * (accuracy - float((reference.argmax(1) == labels).mean())):+.2f} pts), "
            f"labels agree with fp32 {float((chosen == reference.argmax(1)).mean()):.2%}, "
            f"|p - p_fp32| 99th pct {np.quantile(drift, 0.99):.3f} max {drift.max():.3f}"
        )
        if name != "fp32":
            deltas = ", ".join(
                f"{cls} {100 * d:+.2f}" for cls, d in zip(split.classes, recalls - fp32_recalls, strict=True)
            )
            print(f"       recall vs fp32 (points): {deltas}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
