"""Which forward path serves: a precision (fp32, bf16, int8) in a runtime (ONNX Runtime, torch), decided once here.

Precision "auto" serves the fastest path on this machine (timed once per process) among those
installed and measured accurate enough: fp32 in ONNX Runtime (`<checkpoint>.onnx`) or torch,
bf16 in torch where the CPU runs it natively, and int8 in ONNX Runtime (`<checkpoint>.int8.onnx`).
A reduced precision is a candidate only when the checkpoint's stored val accuracy for it is
within `ACCURACY_TOLERANCE` of fp32's. `FER_RUNTIME` narrows the runtimes. Nothing here imports
torch unless a torch path is a candidate and torch is installed: the service serves without it.
The predictor serves what this resolves; the Ray driver resolves once so that every worker
answers in the same precision.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from models.checkpoint import Checkpoint
from models.errors import CheckpointError
from models.onnx_network import OnnxNetwork, onnx_model_path, onnxruntime_available

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Where the network runs: "auto" takes every runtime installed that can run the precision.
Runtime = Literal["auto", "onnxruntime", "torch"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
# What each runtime runs: int8 is an ONNX Runtime quantisation, bf16 is torch's autocast.
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "torch": ("fp32", "bf16")}
# A reduced precision may serve under "auto" when its val accuracy is at most this far below fp32's.
ACCURACY_TOLERANCE = 0.003
# The batch sizes "auto" times: a lone request and the largest batch the service forms.
TIMED_BATCHES = (1, 32)
# Paths whose timed speeds are this close count as equally fast (`fastest`).
SPEED_MARGIN = 0.15

# vdpbf16ps (AVX-512 BF16) or AMX tiles make bf16 matmuls faster than fp32; without them
# oneDNN emulates bf16 and it is slower than fp32.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

Forward = Callable[[np.ndarray], np.ndarray]


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


def images_per_second(forward: Forward, size: int, batch: int, budget_s: float = 0.08) -> float:
    """Faces per second of `forward` on a batch of `batch` zero faces, timed for about `budget_s` after a warm-up."""
    faces = np.zeros((batch, 1, size, size), np.float32)
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
class ForwardPath:
    """One way to run the network: normalised faces (N, 1, size, size) float32 → float32 logits."""

    precision: str
    runtime: str
    forward: Forward
    recipe: str = ""  # how its ONNX file was made ("" for torch)

    @property
    def name(self) -> str:
        """How logs and the speeds table name it: "int8/onnxruntime"."""
        return f"{self.precision}/{self.runtime}"


@dataclass(frozen=True)
class PrecisionChoice:
    """The path to serve and what "auto" timed (path name → batch → faces/s; {} when nothing was timed)."""

    path: ForwardPath
    speeds: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """The served precision, whose stored figures describe the answers."""
        return self.path.precision


def torch_available() -> bool:
    """Whether torch can be imported here (the `train` extra installs it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_precision(
    checkpoint: Checkpoint, asked: Precision, threads: int, runtime: Runtime = "auto"
) -> PrecisionChoice:
    """The path to serve `checkpoint` in: `asked` (or for "auto" the fastest accurate one here) in `runtime`.

    Raises:
        ValueError: an unknown precision or runtime, or a pair that cannot run (int8 in torch).
        CheckpointError: nothing installed here can serve what was asked (a missing or foreign
            ONNX file, torch not installed); one line naming each reason.
    """
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {asked!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    runtimes = [name for name in ("onnxruntime", "torch") if runtime in ("auto", name)]
    wanted = [p for p in ("fp32", "bf16", "int8") if asked in ("auto", p)]
    pairs = [(p, r) for p in wanted for r in runtimes if p in RUNTIME_PRECISIONS[r]]
    if not pairs:
        raise ValueError(
            f"precision {asked} does not run in {runtime} (it runs {asked} in "
            + ("onnxruntime only)" if asked == "int8" else "torch only)")
        )
    if asked == "auto":
        pairs = [(p, r) for p, r in pairs if p == "fp32" or _reduced_candidate(checkpoint, p)]
    # Runtime "auto" stays within ONNX Runtime when one of its files loads: importing torch only
    # to time it would add seconds to every start (docs/runtimes.md), and the measured fastest
    # path here is an ONNX one. torch serves when asked for, for bf16, or when no ONNX path can.
    onnx_pairs = [(p, r) for p, r in pairs if r == "onnxruntime"]
    paths, refusals = _load_paths(checkpoint, onnx_pairs, threads)
    if not paths:
        torch_paths, torch_refusals = _load_paths(
            checkpoint, [pair for pair in pairs if pair not in onnx_pairs], threads
        )
        paths, refusals = paths + torch_paths, refusals + torch_refusals
    if not paths:
        raise CheckpointError(f"cannot serve {asked} in {runtime}: " + "; ".join(refusals))
    for refusal in refusals:
        logger.info("precision %s: not a candidate: %s", asked, refusal)
    if len(paths) == 1:
        return PrecisionChoice(paths[0])
    names = tuple(path.name for path in paths)
    key = (checkpoint.sha256 or str(id(checkpoint)), names, threads)
    if key not in _SPEEDS:
        size = checkpoint.preprocessing.size
        _SPEEDS[key] = {
            path.name: {batch: images_per_second(path.forward, size, batch) for batch in TIMED_BATCHES}
            for path in paths
        }
    speeds = _SPEEDS[key]
    mode = checkpoint.figures.measured_tta
    accuracy = {
        path.name: float(figures["accuracy"])
        for path in paths
        if (figures := checkpoint.figures.metrics_for(mode, path.precision)) is not None and "accuracy" in figures
    }
    chosen = fastest(speeds, accuracy)
    logger.info(
        "precision %s: %s (faces/s at batch %s: %s)",
        asked,
        chosen,
        "/".join(map(str, TIMED_BATCHES)),
        ", ".join(f"{name} {'/'.join(f'{r:.0f}' for r in rates.values())}" for name, rates in speeds.items()),
    )
    return PrecisionChoice(next(path for path in paths if path.name == chosen), speeds)


def _load_paths(
    checkpoint: Checkpoint, pairs: list[tuple[str, str]], threads: int
) -> tuple[list[ForwardPath], list[str]]:
    """The paths of `pairs` that load here, and a reason for each that does not."""
    paths: list[ForwardPath] = []
    refusals: list[str] = []
    has_torch = any(r == "torch" for _, r in pairs) and torch_available()
    network = None
    for precision, runtime in pairs:
        if runtime == "onnxruntime":
            if not onnxruntime_available():
                refusals.append(f"{precision} in onnxruntime: ONNX Runtime is not installed")
                continue
            try:
                onnx = OnnxNetwork(
                    onnx_model_path(checkpoint.path, precision),
                    precision=precision,
                    expected_weights=checkpoint.weights_sha256,
                    num_classes=len(checkpoint.classes),
                    size=checkpoint.preprocessing.size,
                    threads=threads,
                )
            except CheckpointError as exc:
                refusals.append(str(exc))
                continue
            paths.append(ForwardPath(precision, runtime, onnx, onnx.recipe))
        elif not has_torch:
            refusals.append(f"{precision} in torch: torch is not installed (pip install 'fer-service[train]')")
        else:
            from models.torch_backend import inference_network, torch_forward

            network = network if network is not None else inference_network(checkpoint)
            paths.append(ForwardPath(precision, runtime, torch_forward(network, precision, threads)))
    return paths, refusals


def _reduced_candidate(checkpoint: Checkpoint, precision: str) -> bool:
    """Whether "auto" may consider a reduced precision: bf16 where the CPU runs it, both when measured accurate."""
    if precision == "bf16" and not cpu_supports_bf16():
        return False
    return _accurate_enough(checkpoint, precision)


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
