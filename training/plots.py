"""Plots of a trained checkpoint: loss and accuracy curves, confusion matrices, a sample grid.

python -m training.plots --checkpoint models/checkpoint.pth --out-dir docs/images
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.errors import FerError  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from models.preprocessing import to_model_input  # noqa: E402
from training.data import default_data_dir, load_split  # noqa: E402
from training.helpformat import DefaultsHelpFormatter  # noqa: E402

logger = logging.getLogger(__name__)


def plot_curves(
    history: list[dict[str, float]], key: str, ylabel: str, path: Path, schedule: Sequence[dict[str, int]] = ()
) -> None:
    """Train and val `key` (loss or accuracy) per epoch; a dotted line where a resume stretched the schedule."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [row[f"train_{key}"] for row in history], label="train")
    ax.plot(epochs, [row[f"val_{key}"] for row in history], label="val")
    for segment in schedule[1:]:
        ax.axvline(segment["from_epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            f"→ {segment['epochs']} epochs",
            (segment["from_epoch"] - 0.5, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="grey",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Counts beside row-normalised rates; rows are the truth."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, values, title, fmt in (
        (axes[0], matrix, "counts", "d"),
        (axes[1], rates, "row-normalised (recall)", ".2f"),
    ):
        ax.imshow(values, cmap="Blues")
        ax.set_title(title)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        high = values.max() / 2
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center",
                        color="white" if values[i, j] > high else "black", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(pixels: np.ndarray, truth: Sequence[str], predicted: Sequence[str], path: Path) -> None:
    """A 3×3 grid of faces with true and predicted labels; green when right, red when wrong."""
    fig, axes = plt.subplots(3, 3, figsize=(6.5, 7))
    for ax, face, true_label, guess in zip(axes.flat, pixels, truth, predicted, strict=True):
        ax.imshow(face, cmap="gray", vmin=0, vmax=255)
        right = true_label == guess
        ax.set_title(
            f"{'✓' if right else '✗'} true {true_label}\npred {guess}", color="green" if right else "red", fontsize=9
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m training.plots",
        description="Draw the training curves, confusion matrices and a sample grid as PNG files.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("models/checkpoint.pth"),
        help="trained checkpoint (its history and stored metrics)",
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics JSON from training.evaluate --json (default: the checkpoint's stored metrics)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset root for the sample grid (default: $FER2013_DIR or ../shared/datasets/fer2013)",
    )
    parser.add_argument("--split", default="val", help="split the sample grid draws from")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/images"), help="where the PNG files go")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the nine sample images")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint)
    except FerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoint = predictor.checkpoint
    metrics: dict[str, Any] = json.loads(args.metrics.read_text()) if args.metrics else checkpoint.metrics
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    history = checkpoint.training.get("history", [])
    if history:
        schedule = checkpoint.training.get("schedule", [])
        plot_curves(history, "loss", "cross-entropy", args.out_dir / "loss.png", schedule)
        plot_curves(history, "accuracy", "accuracy", args.out_dir / "accuracy.png", schedule)
        written += ["loss.png", "accuracy.png"]
    if "confusion_matrix" in metrics:
        plot_confusion(np.array(metrics["confusion_matrix"]), checkpoint.classes, args.out_dir / "confusion.png")
        written.append("confusion.png")
    split_dir = (args.data_dir or default_data_dir()) / args.split
    if split_dir.is_dir():
        split = load_split(split_dir, checkpoint.preprocessing)
        chosen = np.random.default_rng(args.seed).choice(len(split), size=9, replace=False)
        pixels = split.pixels[chosen]
        inputs = to_model_input(torch.from_numpy(pixels), checkpoint.preprocessing)
        guesses = predictor.predict_tensors(inputs).argmax(1)
        plot_samples(
            pixels, [split.classes[i] for i in split.labels[chosen]], [checkpoint.classes[i] for i in guesses],
            args.out_dir / "samples.png",
        )  # fmt: skip
        written.append("samples.png")
    else:
        logger.warning("%s not found: no sample grid", split_dir)
    print("wrote " + ", ".join(str(args.out_dir / name) for name in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
