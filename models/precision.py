"""In what precision the network runs: bf16 detection, autocast, and `resolve_precision`, the one place "auto" is decided.

Precision "auto" serves the fastest path on this machine (timed once per process) among fp32,
bf16 where the CPU runs it natively, and int8 where its quantised file is present and valid; a
reduced precision is a candidate only when the checkpoint's stored val accuracy for it is within
`ACCURACY_TOLERANCE` of fp32's. The predictor serves what it resolves; the Ray driver resolves
once so that every worker answers in the same precision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from models.checkpoint import Checkpoint
from models.errors import CheckpointError
from models.int8 import Int8Network, int8_model_path, weights_sha256
from models.network import fuse_for_inference

logger = logging.getLogger(__name__)

# "auto": the fastest path on this machine among those measured accurate enough (`fastest`);
# fp32 and bf16 run the torch network, int8 its ONNX Runtime quantisation (models/int8.py).
Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# A reduced precision may serve under "auto" when its val accuracy is at most this far below fp32's.
ACCURACY_TOLERANCE = 0.003
# The batch sizes "auto" times: a lone request and the largest batch the service forms.
TIMED_BATCHES = (1, 32)
# Paths whose timed speeds are this close count as equally fast (`fastest`).
SPEED_MARGIN = 0.15

# vdpbf16ps (AVX-512 BF16) or AMX tiles make bf16 matmuls faster than fp32; without them
# oneDNN emulates bf16 and it is slower than fp32.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX-512 BF16 or AMX-BF16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16 for `precision` ("auto", "bf16" or "fp32") on `device` (training's rule)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_supports_bf16()


def autocast(device: torch.device, use_bf16: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on `device` when `use_bf16`, else a no-op context."""
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def images_per_second(
    forward: Callable[[torch.Tensor], object], size: int, batch: int, budget_s: float = 0.08
) -> float:
    """Faces per second of `forward` on a batch of `batch` zero faces, timed for about `budget_s` after a warm-up."""
    faces = torch.zeros(batch, 1, size, size)
    forward(faces)
    forward(faces)
    runs, started = 0, time.perf_counter()
    while True:
        forward(faces)
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s and runs >= 3:
            return runs * batch / elapsed


def fastest(speeds: Mapping[str, Mapping[int, float]], accuracy: Mapping[str, float]) -> str:
    """The path to serve: the fastest by the geometric mean of faces/s over the timed batch sizes.

    Paths within `SPEED_MARGIN` of the fastest count as equally fast, and of those the most
    accurate on val serves (`accuracy`; a path missing from it counts as least accurate): the
    start-up timing is short and noisy, and replicas of one service should not pick different
    paths, and give slightly different answers, on a whim.

    One path serves every batch: a face's answer must not depend on what it was batched with,
    and switching paths by batch size would make it so.
    """
    rates = {
        name: math.exp(math.fsum(math.log(r) for r in by_batch.values()) / len(by_batch))
        for name, by_batch in speeds.items()
    }
    top = max(rates.values())
    near = [name for name in speeds if rates[name] * (1 + SPEED_MARGIN) >= top]
    return max(near, key=lambda name: (accuracy.get(name, -1.0), rates[name]))


# "auto"'s timings, once per process and set of candidates: the machine does not change under it,
# and tests and `training.evaluate` build many predictors of one checkpoint.
_SPEEDS: dict[tuple[str, tuple[str, ...], int], dict[str, dict[int, float]]] = {}


@dataclass(frozen=True)
class PrecisionChoice:
    """The path to serve, the int8 network when it is int8's (or was a candidate), and what "auto" timed."""

    precision: str
    int8: Int8Network | None = None
    speeds: dict[str, dict[int, float]] = field(default_factory=dict)  # {} when nothing was timed


def inference_network(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network as served: BatchNorm folded, Dropout dropped, channels_last.

    channels_last: bf16 convolutions in oneDNN run about 2× faster in NHWC (benchmarks/infer.py).
    """
    return fuse_for_inference(checkpoint.network).to(torch.device("cpu")).to(memory_format=torch.channels_last)


def torch_forward(network: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised faces → float32 logits through `network` in fp32 or bf16 (no lock taken)."""
    device = torch.device("cpu")

    def forward(faces: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, precision == "bf16"):
            logits: torch.Tensor = network(faces.contiguous(memory_format=torch.channels_last))
            return logits.float()

    return forward


def load_int8(checkpoint: Checkpoint, threads: int) -> Int8Network:
    """The checkpoint's quantised network; raises `CheckpointError` when it is missing or not these weights."""
    return Int8Network(
        int8_model_path(checkpoint.path),
        expected_weights=weights_sha256(checkpoint.network),
        num_classes=len(checkpoint.classes),
        size=checkpoint.preprocessing.size,
        threads=threads,
    )


def resolve_precision(
    checkpoint: Checkpoint, asked: Precision, threads: int, network: nn.Module | None = None
) -> PrecisionChoice:
    """The path to serve `checkpoint` in: `asked` itself, or for "auto" the fastest accurate one here.

    `network` is the served network (`inference_network`), built here when not given. Raises
    `CheckpointError` when int8 is asked for and its file is missing or not these weights.
    """
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {asked!r}")
    if asked == "int8":
        return PrecisionChoice("int8", load_int8(checkpoint, threads))
    if asked != "auto":
        return PrecisionChoice(asked)
    candidates, int8 = ["fp32"], None
    if cpu_supports_bf16() and _accurate_enough(checkpoint, "bf16"):
        candidates.append("bf16")
    if _accurate_enough(checkpoint, "int8"):
        try:
            int8 = load_int8(checkpoint, threads)
            candidates.append("int8")
        except CheckpointError as exc:
            logger.warning("precision auto: not serving int8 (%s)", exc)
    if len(candidates) == 1:
        return PrecisionChoice(candidates[0], int8)
    key = (checkpoint.sha256 or str(id(checkpoint)), tuple(candidates), threads)
    if key not in _SPEEDS:
        served = network if network is not None else inference_network(checkpoint)
        size = checkpoint.preprocessing.size
        _SPEEDS[key] = {
            name: {
                batch: images_per_second(int8 if name == "int8" and int8 else torch_forward(served, name), size, batch)
                for batch in TIMED_BATCHES
            }
            for name in candidates
        }
    speeds = _SPEEDS[key]
    mode = checkpoint.figures.measured_tta
    accuracy = {
        name: float(figures["accuracy"])
        for name in candidates
        if (figures := checkpoint.figures.metrics_for(mode, name)) is not None and "accuracy" in figures
    }
    chosen = fastest(speeds, accuracy)
    logger.info(
        "precision auto: %s (faces/s at batch %s: %s)",
        chosen,
        "/".join(map(str, TIMED_BATCHES)),
        ", ".join(f"{name} {'/'.join(f'{r:.0f}' for r in rates.values())}" for name, rates in speeds.items()),
    )
    return PrecisionChoice(chosen, int8, speeds)


def _accurate_enough(checkpoint: Checkpoint, precision: str) -> bool:
    """Whether the stored val figures put `precision` within `ACCURACY_TOLERANCE` of fp32.

    A checkpoint with no per-precision figures keeps the rule every earlier checkpoint was
    served by (bf16 where native) and never gets int8 unmeasured.
    """
    figures = checkpoint.figures
    if len(figures.measured_precisions()) < 2:  # evaluated in one precision, or never
        if precision == "bf16":
            return True
        logger.info(
            "precision auto: the checkpoint stores val figures of one precision only: %s is not a candidate", precision
        )
        return False
    mode = figures.measured_tta
    reduced, full = figures.metrics_for(mode, precision), figures.metrics_for(mode, "fp32")
    if reduced is None or full is None:
        logger.info("precision auto: no stored val figures compare %s with fp32: it is not a candidate", precision)
        return False
    close = float(reduced["accuracy"]) >= float(full["accuracy"]) - ACCURACY_TOLERANCE
    if not close:
        logger.warning(
            "precision auto: %s measured %.4f on val against fp32's %.4f, more than %.1f points below; not served",
            precision, reduced["accuracy"], full["accuracy"], 100 * ACCURACY_TOLERANCE,
        )  # fmt: skip
    return close
