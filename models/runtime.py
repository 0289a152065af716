"""Where and in what precision the network runs: bf16 detection, autocast, and picking the fastest path."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, get_args

import torch

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
