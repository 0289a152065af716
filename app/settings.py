"""The service's one settings object, read from `FER_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; an invalid value stops start-up with a one-line reason."""

    model_config = SettingsConfigDict(env_prefix="FER_", frozen=True, extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path = Path(__file__).resolve().parent.parent / "models" / "checkpoint.pth"
    # 32 images per forward pass: images/s at batch 32 is near the plateau on 2 cores (benchmarks/infer.py)
    max_batch: int = Field(32, ge=1, le=1024)
    # No waiting: a lone request runs at once, and under load the requests that queue during one
    # forward pass form the next batch (benchmarks/RESULTS.md measured 0 against 2 ms).
    max_wait_ms: float = Field(0.0, ge=0, le=1000)
    queue_size: int = Field(256, ge=1, le=100_000)
    max_batch_files: int = Field(64, ge=1, le=10_000)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    body_timeout_s: float = Field(15.0, gt=0, description="a stalled upload is cut off after this many seconds")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    # Decoding and face detection of photos: one thread per core keeps the cores busy without
    # dozens of threads contending (and each holding decode buffers) under load.
    prepare_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Test-time augmentation; "checkpoint" serves what the checkpoint's metrics were measured with.
    # "tencrop" lifts macro-F1 by 2-3 points for ten forward passes per face (docs/tta.md).
    tta: Literal["checkpoint", "none", "flip", "tencrop"] = "checkpoint"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    graceful_shutdown_s: float = Field(20.0, ge=0)


def settings_error_line(error: ValidationError) -> str:
    """A pydantic validation error as one line naming the environment variables at fault."""
    parts = []
    for item in error.errors():
        name = "FER_" + "_".join(str(part) for part in item["loc"]).upper()
        parts.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts)
