"""The engine's configuration for `fer`: the service's `FER_*` environment first, then the command's flags.

`FER_DETECTOR=haar fer predict …` searches with Haar as the service would; a flag given on the
command line wins over the variable. `fer predict` and `fer video` share the flags below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from models.config import EngineConfig, config_error_line, engine_config
from models.errors import FerError
from models.precision import PRECISIONS, RUNTIMES
from models.tta import TTA_MODES


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --precision, --runtime and --tta; unset, each is its `FER_*` variable's or the engine's default."""
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to use (default: $FER_CHECKPOINT or the shipped one)"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="forward-pass precision (default: $FER_PRECISION or auto)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default=None,
        help="where the network runs: onnxruntime, or torch where it is installed (default: $FER_RUNTIME or auto, "
        "the fastest installed)",
    )  # fmt: skip
    parser.add_argument(
        "--tta", choices=("checkpoint", *TTA_MODES), default=None,
        help="test-time augmentation: tencrop averages ten views of each face, more accurate and about ten "
        "times the model time (docs/tta.md); checkpoint: the mode its stored metrics were measured with "
        "(default: $FER_TTA or checkpoint)",
    )  # fmt: skip


def cli_engine_config(
    args: argparse.Namespace, defaults: Mapping[str, Any] | None = None, **flags: Any
) -> EngineConfig:
    """`FER_*` from the environment, then `defaults` where it says nothing, with the flags (None: not given) on top.

    The queue holds at least two batches, so a chunk of files never finds it full. Raises
    `pydantic.ValidationError` for a bad variable or flag value.
    """
    given = {
        "checkpoint": args.checkpoint, "precision": args.precision, "runtime": args.runtime, "tta": args.tta, **flags
    }  # fmt: skip
    try:
        config = engine_config(os.environ, defaults, **given)
    except ValidationError as exc:  # a flag's value is named as the flag, not as a variable never set
        named = {
            name: FLAG_OF.get(name, "--" + name.replace("_", "-")) for name, value in given.items() if value is not None
        }
        raise FlagError(config_error_line(exc, named)) from None
    return dataclasses.replace(config, queue_size=max(config.queue_size, 2 * config.max_batch))


# The flag that sets an engine field, where its name is not the field's.
FLAG_OF = {
    "max_batch": "--batch-size",
    "video_fps": "--fps",
    "max_video_seconds": "--max-seconds",
    "video_smooth_s": "--smooth",
}


class FlagError(FerError):
    """A command-line value the engine's configuration refuses (or an environment variable beside it)."""
