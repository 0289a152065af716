"""The service's one settings object, read from `FER_*` environment variables.

The engine's knobs take their defaults from `models.engine.EngineConfig` (one home for each
default); the rest are the HTTP layer's own. The README's settings table is this class
(tests/test_docs.py checks the two agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.checkpoint import SHIPPED_CHECKPOINT
from models.detectors import DetectorName
from models.engine import ENGINE_DEFAULTS, EngineConfig, cpu_count
from models.runtime import Precision
from models.tta import ServedTta


class Settings(BaseSettings):
    """Every knob of the service; an invalid value stops start-up with a one-line reason."""

    model_config = SettingsConfigDict(env_prefix="FER_", frozen=True, extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path = SHIPPED_CHECKPOINT  # `fer` finds it the same way
    # The engine's knobs (models/engine.py says why each default is what it is).
    max_batch: int = Field(ENGINE_DEFAULTS.max_batch, ge=1, le=1024)
    max_wait_ms: float = Field(ENGINE_DEFAULTS.max_wait_ms, ge=0, le=1000)
    queue_size: int = Field(ENGINE_DEFAULTS.queue_size, ge=1, le=100_000)
    batch_patience_s: float = Field(ENGINE_DEFAULTS.batch_patience_s, gt=0, le=600)
    max_pixels: int = Field(ENGINE_DEFAULTS.max_pixels, ge=1)
    max_pending_pixels: int = Field(ENGINE_DEFAULTS.max_pending_pixels, ge=1)
    max_batch_pixels: int = Field(ENGINE_DEFAULTS.max_batch_pixels, ge=1)
    decode_timeout_s: float = Field(ENGINE_DEFAULTS.decode_timeout_s, gt=0, le=600)
    threads: int = Field(default_factory=cpu_count, ge=1, le=256)
    prepare_workers: int = Field(default_factory=cpu_count, ge=1, le=256)
    opencv_threads: int = Field(ENGINE_DEFAULTS.opencv_threads, ge=1, le=256)
    detector: DetectorName = ENGINE_DEFAULTS.detector
    detector_model: Path | None = ENGINE_DEFAULTS.detector_model
    detect_max_side: int = Field(ENGINE_DEFAULTS.detect_max_side, ge=64, le=4096)
    decode_max_side: int = Field(ENGINE_DEFAULTS.decode_max_side, ge=64, le=100_000)
    max_faces: int = Field(ENGINE_DEFAULTS.max_faces, ge=1, le=1000)
    min_face_px: int = Field(ENGINE_DEFAULTS.min_face_px, ge=1, le=10_000)
    precision: Precision = ENGINE_DEFAULTS.precision
    # "tencrop" lifts macro-F1 by 2-3 points for ten forward passes per face (docs/tta.md).
    tta: ServedTta = ENGINE_DEFAULTS.tta
    video_fps: float = Field(ENGINE_DEFAULTS.video_fps, gt=0, le=60)
    max_video_seconds: float = Field(ENGINE_DEFAULTS.max_video_seconds, gt=0, le=3600)
    video_max_side: int = Field(ENGINE_DEFAULTS.video_max_side, ge=64, le=8192)
    video_smooth_s: float = Field(ENGINE_DEFAULTS.video_smooth_s, ge=0, le=60)
    max_video_pixels: int = Field(ENGINE_DEFAULTS.max_video_pixels, ge=1)
    # The HTTP layer's own.
    max_batch_files: int = Field(64, ge=1, le=10_000)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_video_bytes: int = Field(50 * 1024 * 1024, ge=1024)  # POST /predict/video's own upload limit
    # Videos uploaded or analysed at once: each holds up to twice FER_MAX_VIDEO_BYTES in /tmp
    # (the spooled upload and the file OpenCV reads) and a prepare thread; more get 503.
    max_video_jobs: int = Field(2, ge=1, le=64)
    body_timeout_s: float = Field(15.0, gt=0, description="a stalled upload is cut off after this many seconds")
    body_deadline_s: float = Field(120.0, gt=0, description="a whole body must arrive within this many seconds")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    max_pipelined: int = Field(32, ge=1, le=10_000)
    max_connections: int = Field(512, ge=1, le=100_000)
    keep_alive_s: float = Field(5.0, gt=0, le=600)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    graceful_shutdown_s: float = Field(20.0, ge=0)

    def engine_config(self) -> EngineConfig:
        """The engine's knobs from these settings."""
        return EngineConfig(
            precision=self.precision,
            tta=self.tta,
            threads=self.threads,
            prepare_workers=self.prepare_workers,
            opencv_threads=self.opencv_threads,
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            queue_size=self.queue_size,
            max_pixels=self.max_pixels,
            max_pending_pixels=self.max_pending_pixels,
            max_batch_pixels=self.max_batch_pixels,
            decode_timeout_s=self.decode_timeout_s,
            batch_patience_s=self.batch_patience_s,
            detector=self.detector,
            detector_model=self.detector_model,
            detect_max_side=self.detect_max_side,
            decode_max_side=self.decode_max_side,
            max_faces=self.max_faces,
            min_face_px=self.min_face_px,
            video_fps=self.video_fps,
            max_video_seconds=self.max_video_seconds,
            video_max_side=self.video_max_side,
            video_smooth_s=self.video_smooth_s,
            max_video_pixels=self.max_video_pixels,
        )


def settings_error_line(error: ValidationError) -> str:
    """A pydantic validation error as one line naming the environment variables at fault."""
    parts = []
    for item in error.errors():
        # loc[0] is the field; a union type adds which member refused, which names no variable.
        name = f"FER_{str(item['loc'][0]).upper()}" if item["loc"] else "FER_*"
        parts.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts)
