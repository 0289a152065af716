"""Train a network on FER2013 and write a checkpoint with its val metrics.

python -m training.train --run-dir runs/default --output models/checkpoint.pth
python -m training.train --run-dir runs/default --output models/checkpoint.pth --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_checkpoint, store_metrics
from models.errors import CheckpointError
from models.network import ARCHITECTURES, build_network
from models.predictor import Predictor
from models.preprocessing import PreprocessingSpec
from training.config import (
    BASE_CHECKPOINT,
    BASE_COMMAND,
    RECIPES,
    TEACHER_COMMAND,
    TEACHER_FILE,
    TrainConfig,
    check_config,
    config_for,
)
from training.data import Split, default_data_dir, load_split
from training.evaluate import evaluate_predictor, format_table, split_majority
from training.ferplus import LABEL_MODES, VOTES_FILE, ferplus_majority, read_votes, training_targets
from training.helpformat import DefaultsHelpFormatter
from training.loop import starting_weights, target_prior, train
from training.speed import keep_freed_memory
from training.teacher import read_teacher, with_teacher

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags; unset recipe flags take the recipe's values (training/config.py)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a network (see --architecture) on a FER2013 folder layout (train/ and val/).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="default",
        help="'seed' reproduces the seed notebook; 'default' trains the model 'ferplus' and 'distil' fine-tune; "
        "'distil' (FER+ votes and a photo-trained teacher) trains the shipped model",
    )
    parser.add_argument(
        "--architecture",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="the network to train, by name (every recipe: EmotionRecognitionModelPyTorch)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset root with train/ and val/ (default: $FER2013_DIR or ../shared/datasets/fer2013)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path("runs/default"),
        help="folder for state.pt (resumable state) and history.json",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="checkpoint to write at the end (default: RUN_DIR/checkpoint.pth)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its state.pt, with the same flags (--epochs and --interpolation may change)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/fer2013"),
        help="decoded uint8 cache, rebuilt when the folder changes",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="number of epochs (recipe default: seed 1000 with early stopping, default 45)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (seed 64, default 128)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (seed 1e-4, default 2e-3)")
    parser.add_argument(
        "--weight-decay", type=float, default=None, help="weight decay (seed 0, default 0.05 decoupled)"
    )
    parser.add_argument(
        "--optimizer", choices=("adam", "adamw", "sgd"), default=None, help="optimiser (sgd uses Nesterov momentum 0.9)"
    )
    parser.add_argument(
        "--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (seed 0, default 0.1)"
    )
    parser.add_argument(
        "--label-mode",
        choices=LABEL_MODES,
        default=None,
        help="targets: the folder labels, the FER+ majority or the FER+ vote distribution (training/ferplus.py)",
    )
    parser.add_argument(
        "--original-weight",
        type=float,
        default=None,
        help="weight of the folder's one-hot label mixed into a FER+ target (0 = FER+ alone)",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="a teacher's probabilities for the training images (training/teacher.py), for distillation",
    )
    parser.add_argument(
        "--teacher-weight",
        type=float,
        default=None,
        help="share of the teacher's probabilities in each target: (1-w)*label mode's + w*teacher's",
    )
    parser.add_argument(
        "--logit-adjustment",
        type=float,
        default=None,
        help="tau of the logit-adjusted loss: served logits assume prior^(1-tau) (1 = classes equally likely)",
    )
    parser.add_argument(
        "--init-from", type=Path, default=None, help="start from this checkpoint's weights (fine-tuning)"
    )
    parser.add_argument(
        "--interpolation",
        type=float,
        default=None,
        help="with --init-from: the checkpoint gets (1-a)*start + a*fine-tuned weights (WiSE-FT; 1 = fine-tuned alone)",
    )
    parser.add_argument(
        "--perspective", type=float, default=None, help="keystone warp of up to this fraction, as a turned head"
    )
    parser.add_argument("--gamma-range", type=float, default=None, help="gamma within [exp(-g), exp(g)]")
    parser.add_argument("--contrast-range", type=float, default=None, help="contrast within [1 - c, 1 + c]")
    parser.add_argument("--blur-probability", type=float, default=None, help="probability of a light blur per image")
    parser.add_argument(
        "--erase-probability",
        type=float,
        default=None,
        help="probability of random erasing per image (seed 0, default 0.5)",
    )
    parser.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="Gaussian noise std on the normalised input (seed 0.05, default 0)",
    )
    parser.add_argument(
        "--selection",
        choices=("final", "val_loss", "val_accuracy"),
        default=None,
        help="which epoch's weights become the checkpoint (seed val_loss, default final)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed for initialisation, shuffling and augmentation"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=None,
        help="auto = bf16 autocast on CPUs with AVX-512 BF16/AMX and on CUDA, else fp32",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def interpolated(
    config: TrainConfig, trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The weights the checkpoint gets: `trained`, or its WiSE-FT blend with the starting weights (TrainConfig.interpolation)."""
    if start is None or config.interpolation == 1.0:
        return trained
    weight = config.interpolation
    return {
        name: (1.0 - weight) * start[name] + weight * tensor if tensor.is_floating_point() else tensor
        for name, tensor in trained.items()
    }


def labelled(
    config: TrainConfig, data_dir: Path, train_split: Split, val_split: Split
) -> tuple[Split, np.ndarray, np.ndarray | None]:
    """(the training images the label mode keeps, their targets (N, C), val's FER+ majority or None).

    The FER+ votes file is read when the mode needs it, and otherwise when it is there, for the
    per-epoch and stored FER+ figures; an original-label run without it trains as before.
    """
    votes_file = data_dir / VOTES_FILE
    if config.label_mode == "original":
        one_hot = training_targets(train_split.labels, train_split.classes, "original", None)[0]
        return (*taught(config, train_split, one_hot), split_majority(data_dir / "val", val_split))
    train_votes = read_votes(votes_file, "train", train_split.paths)
    targets, keep = training_targets(
        train_split.labels, train_split.classes, config.label_mode, train_votes, config.original_weight
    )
    val_majority = ferplus_majority(read_votes(votes_file, "val", val_split.paths), val_split.classes)
    if not keep.all():
        logger.info("label mode %s keeps %d of %d training images", config.label_mode, keep.sum(), len(keep))
        train_split = Split(
            pixels=train_split.pixels[keep],
            labels=train_split.labels[keep],
            classes=train_split.classes,
            paths=tuple(path for path, kept in zip(train_split.paths, keep, strict=True) if kept),
        )
    return (*taught(config, train_split, targets[keep]), val_majority)


def taught(config: TrainConfig, train_split: Split, targets: np.ndarray) -> tuple[Split, np.ndarray]:
    """The split and its targets with the teacher's probabilities mixed in and its turned views added
    (TrainConfig.teacher, training/teacher.py), or both as they are."""
    if not config.teacher:
        return train_split, targets
    teacher, views = read_teacher(
        Path(config.teacher), "train", train_split.paths, train_split.classes, train_split.pixels.shape[1:]
    )
    mixed = with_teacher(targets, teacher, config.teacher_weight)
    logger.info("teacher %s: weight %.2f in every target", config.teacher, config.teacher_weight)
    if views is None:
        return train_split, mixed
    logger.info("teacher %s: %d turned views added to %d images", config.teacher, len(views.sources), len(train_split))
    grown = Split(
        pixels=np.concatenate([train_split.pixels, views.pixels]),
        labels=np.concatenate([train_split.labels, train_split.labels[views.sources]]),
        classes=train_split.classes,
        paths=train_split.paths + tuple(f"{train_split.paths[i]}#turned" for i in views.sources),
    )
    view_targets = with_teacher(targets[views.sources], views.probabilities, config.teacher_weight)
    return grown, np.concatenate([mixed, view_targets])


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM stop training the way Ctrl-C does.

    `docker stop`, `kill` and job schedulers send SIGTERM, and a run started in the background
    from a script ignores SIGINT; either way the run should end with the message that says how to
    resume, not vanish mid-write. The state of the last finished epoch is on disk (written
    atomically), so --resume continues from there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def missing_input_file(config: TrainConfig) -> str | None:
    """Why a file the config names is missing (with the command that makes the recipes' own), or None.

    Checked before the data loads, so a forgotten step costs seconds rather than a split's decode.
    """
    inputs = (
        (config.init_from, "no checkpoint to start from", BASE_CHECKPOINT, f"{BASE_COMMAND} restores it"),
        (config.teacher, "no teacher file", TEACHER_FILE, f"{TEACHER_COMMAND} writes it"),
    )
    for path, what, recipe_file, remedy in inputs:
        if path and not Path(path).is_file():
            hint = f" ({remedy})" if path == recipe_file else ""
            return f"{path}: {what}{hint}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_for(
        args.recipe,
        architecture=args.architecture,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        label_smoothing=args.label_smoothing,
        erase_probability=args.erase_probability,
        label_mode=args.label_mode,
        original_weight=args.original_weight,
        teacher=None if args.teacher is None else str(args.teacher),
        teacher_weight=args.teacher_weight,
        logit_adjustment=args.logit_adjustment,
        init_from=None if args.init_from is None else str(args.init_from),
        interpolation=args.interpolation,
        perspective=args.perspective,
        gamma_range=args.gamma_range,
        contrast_range=args.contrast_range,
        blur_probability=args.blur_probability,
        noise_std=args.noise_std,
        selection=args.selection,
        seed=args.seed,
        precision=args.precision,
        num_threads=args.threads,
    )
    try:
        check_config(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = missing_input_file(config)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir()
    spec = PreprocessingSpec()
    output = args.output or args.run_dir / "checkpoint.pth"
    try:
        train_split = load_split(data_dir / "train", spec, cache_dir=args.cache_dir)
        val_split = load_split(data_dir / "val", spec, cache_dir=args.cache_dir)
        if train_split.classes != val_split.classes:
            raise ValueError(f"train/ classes {train_split.classes} differ from val/ classes {val_split.classes}")
        logger.info("train %d images, val %d images, classes %s", len(train_split), len(val_split), train_split.classes)
        start = starting_weights(config, train_split.classes)
        train_split, targets, val_majority = labelled(config, data_dir, train_split, val_split)
        if config.cpu_speedups and not torch.cuda.is_available():
            keep_freed_memory()  # process-wide, so here and not in train(), which tests call in-process
        with sigterm_interrupts():
            result = train(
                config, train_split, val_split, args.run_dir,
                resume=args.resume, spec=spec, targets=targets, val_majority=val_majority, initial_weights=start,
            )  # fmt: skip
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: resume with --resume --run-dir {args.run_dir}", file=sys.stderr)
        return 130
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0  # rank 0 writes the checkpoint
    prior = target_prior(targets)  # the prior the loss adjusted by
    served_prior = prior ** (1.0 - config.logit_adjustment)
    network = build_network(config.architecture, num_classes=len(train_split.classes))
    network.load_state_dict(interpolated(config, result.state_dict, start))
    save_checkpoint(
        output,
        network,
        classes=train_split.classes,
        preprocessing=spec,
        training={
            "recipe": config.recipe,
            "config": config.to_dict(),
            "chosen_epoch": result.chosen_epoch,
            "selection": config.selection,
            "stopped_early": result.stopped_early,
            "schedule": result.schedule,
            "history": result.history,
            "images": len(train_split),
            # The class prior of the training targets, and the one the served probabilities assume.
            "target_prior": dict(zip(train_split.classes, prior.round(4).tolist(), strict=True)),
            "served_prior": dict(
                zip(train_split.classes, (served_prior / served_prior.sum()).round(4).tolist(), strict=True)
            ),
        },
    )
    # The stored metrics are measured the way `training.evaluate` measures them, through the predictor.
    metrics = evaluate_predictor(Predictor.from_checkpoint(output), val_split, val_majority)
    metrics["split"] = "val"
    store_metrics(output, metrics)
    (args.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics))
    print(f"wrote {output} (epoch {result.chosen_epoch} of {len(result.history)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
