"""Evaluate a checkpoint on a split folder through the shared preprocessing path and predictor.

python -m training.evaluate --checkpoint models/checkpoint.pth --json val-metrics.json --write-metrics

The shipped checkpoint's figures, for every precision and TTA mode the service can serve:

python -m training.evaluate --precision fp32 --also-precision bf16 --also-precision int8 \
    --also-tta flip --also-tta tencrop --write-metrics
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import store_metrics
from models.errors import FerError
from models.precision import PRECISIONS
from models.predictor import Predictor
from models.tta import TTA_MODES
from training.data import Split, default_data_dir, load_split
from training.ferplus import VOTES_FILE, ferplus_majority, read_votes
from training.helpformat import DefaultsHelpFormatter
from training.loop import predict_split
from training.metrics import classification_metrics, expected_calibration_error, mean_cross_entropy

logger = logging.getLogger(__name__)


# What the "ferplus" block of the figures is measured against (training/ferplus.py has the rule).
FERPLUS_TRUTH = (
    "FER+ majority: the class with the most of the ten crowd votes (a plurality), on the images where it is "
    "one of the seven classes and unique (ties and contempt/unknown/not-a-face tops are left out)"
)
ORIGINAL_TRUTH = "FER2013's original labels (the folder each file is in)"


def evaluate_predictor(
    predictor: Predictor, split: Split, majority: np.ndarray | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Metrics of `predictor` on `split`: accuracy, loss, macro-F1, calibration, per class, confusion.

    The top-level figures are against the split's original labels; with `majority` (the split's
    FER+ majority labels, -1 where none) the same classification figures against the FER+ majority
    go under "ferplus". "truth" says which is which.
    """
    if split.classes != predictor.classes:
        raise ValueError(f"the split's classes {split.classes} differ from the checkpoint's {predictor.classes}")
    # The predictor's own forward pass: its precision, its TTA and the fused network, as served.
    probabilities = predict_split(
        predictor.predict_tensors, split, predictor.checkpoint.preprocessing, batch_size=batch_size
    )
    metrics = classification_metrics(split.labels, probabilities.argmax(1), split.classes)
    metrics["loss"] = mean_cross_entropy(split.labels, probabilities)
    metrics["calibration_error"] = expected_calibration_error(split.labels, probabilities)
    metrics["precision"] = predictor.precision
    metrics["tta"] = predictor.tta
    metrics["preprocessing"] = predictor.checkpoint.preprocessing.to_dict()
    metrics["truth"] = ORIGINAL_TRUTH
    if majority is not None and (counted := majority >= 0).any():
        ferplus = classification_metrics(majority[counted], probabilities[counted].argmax(1), split.classes)
        metrics["ferplus"] = {**ferplus, "truth": FERPLUS_TRUTH}
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A per-class table with the overall figures under it."""
    lines = [f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<10} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {row['support']:>8d}"
        )
    lines.append(
        f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  "
        f"ECE {metrics['calibration_error']:.4f}  "
        f"on {metrics['num_images']} images of {metrics['split']} ({metrics['precision']}, tta {metrics['tta']})"
    )
    if "ferplus" in metrics:
        ferplus = metrics["ferplus"]
        recalls = "  ".join(f"{name} {row['recall']:.3f}" for name, row in ferplus["per_class"].items())
        lines.append(
            f"  against the FER+ majority: accuracy {ferplus['accuracy']:.4f}  macro-F1 {ferplus['macro_f1']:.4f}  "
            f"on {ferplus['num_images']} images; recall {recalls}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a checkpoint on a split folder (one sub-folder per class).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to evaluate")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root (default: $FER2013_DIR or ../shared/datasets/fer2013)"
    )
    parser.add_argument("--split", default="val", help="sub-folder of --data-dir to evaluate")
    parser.add_argument(
        "--split-dir", type=Path, default=None, help="evaluate this folder instead of --data-dir/--split"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="forward-pass precision; auto = what the service picks on this machine",
    )
    parser.add_argument(
        "--also-precision",
        choices=[p for p in PRECISIONS if p != "auto"],
        action="append",
        default=[],
        help="also measure in this precision, with the same TTA modes (repeatable); what auto compares with fp32",
    )
    parser.add_argument(
        "--tta",
        choices=("checkpoint", *TTA_MODES),
        default="checkpoint",
        help="test-time augmentation; checkpoint = the mode its stored metrics were measured with (none before any)",
    )
    parser.add_argument(
        "--also-tta",
        choices=TTA_MODES,
        action="append",
        default=[],
        help="also measure with this TTA mode (repeatable); stored under tta_alternatives, for a server run with FER_TTA",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the metrics to this JSON file")
    parser.add_argument(
        "--write-metrics", action="store_true", help="store the metrics in the checkpoint (what GET /metrics serves)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="decode cache folder (default: none, decode every file)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    split_dir = args.split_dir or (args.data_dir or default_data_dir()) / args.split
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, tta=args.tta)
        split = load_split(split_dir, predictor.checkpoint.preprocessing, cache_dir=args.cache_dir)
        modes = [mode for mode in dict.fromkeys(args.also_tta) if mode != predictor.tta]
        majority = split_majority(split_dir, split)
        metrics, alternatives = measure_modes(predictor, split, modes, majority)
        precisions = {
            precision: measure_modes(
                Predictor(predictor.checkpoint, precision=precision, tta=predictor.tta, threads=predictor.threads),
                split,
                modes,
                majority,
            )
            for precision in dict.fromkeys(args.also_precision)
            if precision != predictor.precision
        }
    except (FerError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for measured in (metrics, *alternatives.values(), *(f for m, a in precisions.values() for f in (m, *a.values()))):
        measured["split"] = split_dir.name
        print(format_table(measured))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {**metrics, "tta_alternatives": alternatives} if alternatives else dict(metrics)
        if precisions:
            document["precision_alternatives"] = {
                precision: {**m, "tta_alternatives": a} if a else m for precision, (m, a) in precisions.items()
            }
        args.json.write_text(json.dumps(document, indent=1))
    if args.write_metrics:
        store_metrics(args.checkpoint, metrics, alternatives, precisions)
        logger.info("stored the metrics in %s", args.checkpoint)
    return 0


def split_majority(split_dir: Path, split: Split) -> np.ndarray | None:
    """The FER+ majority labels of a train/ or val/ folder from the votes file beside it; None without one.

    The FER+ figures are optional here: votes that do not fit the folder are reported and skipped.
    """
    votes_file = split_dir.parent / VOTES_FILE
    if split_dir.name not in ("train", "val") or not votes_file.is_file():
        logger.info("no %s beside %s: FER+ figures are not measured", VOTES_FILE, split_dir)
        return None
    try:
        return ferplus_majority(read_votes(votes_file, split_dir.name, split.paths), split.classes)
    except ValueError as exc:
        logger.warning("FER+ figures are not measured: %s", exc)
        return None


def measure_modes(
    predictor: Predictor, split: Split, modes: list[str], majority: np.ndarray | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The predictor's figures in its own TTA mode, and in each of `modes` (same precision)."""
    main = evaluate_predictor(predictor, split, majority)
    others = {
        mode: evaluate_predictor(
            Predictor(predictor.checkpoint, precision=predictor.precision, tta=mode, threads=predictor.threads),  # type: ignore[arg-type]
            split,
            majority,
        )
        for mode in modes
    }
    return main, others


if __name__ == "__main__":
    raise SystemExit(main())
