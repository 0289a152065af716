"""Where and in what precision the network runs: bf16 detection, autocast, threads."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal, get_args

import torch

# "auto": bf16 where the CPU (or GPU) runs it natively, else fp32.
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

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
    """Whether to autocast to bf16 for `precision` ("auto", "bf16" or "fp32") on `device`."""
    if precision not in PRECISIONS:
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
