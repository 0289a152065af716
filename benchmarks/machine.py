"""The machine line every benchmark prints first."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from models.precision import cpu_supports_bf16


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line() -> str:
    flags = cpu_flags()
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, avx512_bf16={'avx512_bf16' in flags}, "
        f"amx_bf16={'amx_bf16' in flags}, bf16 used={cpu_supports_bf16()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )


def write_results(path: Path | None, **results: Any) -> None:
    """Write a benchmark's figures as JSON with the machine line first; no path, no file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_line(), **results}, indent=1))
