"""The engine's configuration: every knob, its default and why, in one typed place.

The service's settings (`app/settings.py`) contain it, read from the same flat `FER_*` names;
`fer` reads the same environment (`engine_config_from_environ`) and lets its flags override it.
Nothing in `models/` reads the environment itself: callers pass it in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from models.checkpoint import SHIPPED_CHECKPOINT
from models.detectors import DetectorName
from models.precision import Precision, Runtime
from models.tta import ServedTta
from models.video import DEFAULT_FPS, DEFAULT_MAX_SIDE, DEFAULT_SMOOTH_S


def cpu_count() -> int:
    """Cores this process may use (the default for the thread counts)."""
    return os.cpu_count() or 1


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EngineConfig:
    """Every knob of the engine, with its default and its bounds; checked when it is built.

    Each one is also a setting of the same name, `FER_` and upper case (the README's table).
    """

    checkpoint: Path = SHIPPED_CHECKPOINT  # the model to serve
    precision: Precision = "auto"
    # Where the network runs: "auto" considers every runtime installed (ONNX Runtime always; torch
    # where the `train` extra is installed) and serves the fastest accurate path (models/precision.py).
    runtime: Runtime = "auto"
    # "tencrop" lifts macro-F1 by 2-3 points for ten forward passes per face (docs/tta.md).
    tta: ServedTta = "checkpoint"
    threads: Annotated[int, Field(ge=1, le=256)] = field(
        default_factory=cpu_count
    )  # the forward pass's threads (ONNX Runtime or torch)
    # The face detector's own threads per search (ONNX Runtime's, inside one photo): 1, since photos
    # are already searched on `prepare_workers` threads at once, and a pool on top of them
    # oversubscribed the cores (docs/photos.md, measured with OpenCV's).
    detector_threads: Annotated[int, Field(ge=1, le=256)] = 1
    # Decoding and face detection of photos: one thread per core keeps the cores busy without
    # dozens of threads contending (and each holding decode buffers) under load.
    prepare_workers: Annotated[int, Field(ge=1, le=256)] = field(default_factory=cpu_count)
    # 32 images per forward pass: images/s at batch 32 is near the plateau on 2 cores (benchmarks/infer.py)
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    # No waiting: a lone request runs at once, and under load the requests that queue during one
    # forward pass form the next batch (benchmarks/RESULTS.md measured 0 against 2 ms).
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 0.0
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = (
        256  # faces waiting for a forward pass; beyond it a single image is refused
    )
    max_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    detector: DetectorName = "yunet"
    detector_model: Path | None = None  # None: the model file shipped beside the detector's module
    # YuNet on a copy at most 320 px on its longer side: 8 ms a photo on one core, and every
    # kdef-dev face found (docs/photos.md); a larger side finds smaller faces in big photos.
    detect_max_side: Annotated[int, Field(ge=64, le=4096)] = 320
    # A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps its longer side at least
    # this: 3× the detection side, so a face YuNet finds at its smallest is still ~30 px to crop.
    decode_max_side: Annotated[int, Field(ge=64, le=100_000)] = 960
    # Pixels to be decoded (from the headers, after JPEG draft scaling) of the uploads on or
    # waiting for the prepare threads; beyond this a photo gets 503 at once, so a flood of big
    # images cannot queue unbounded work: about half a second of decoding on two cores, or
    # twenty phone JPEGs (decoded at a quarter). One image up to the pixel limit is always
    # admitted alone. At 160 M and 48 M an ordinary photo waited 2.1-2.7 s behind 40 clients
    # of 5 MB PNGs (benchmarks/attacks.py), past the 2 s it should be answered or shed in.
    max_pending_pixels: Annotated[int, Field(ge=1)] = 16_000_000
    # Pixels to decode in one /predict/batch upload, all its images together: about 3 s of
    # decoding on two cores, so no single request holds the prepare threads for long (a batch
    # of twenty 36-megapixel PNGs would take them for ~20 s).
    max_batch_pixels: Annotated[int, Field(ge=1)] = 160_000_000
    # A decode still reading the data after this long is stopped (a crafted file can take
    # minutes); a 40-megapixel PNG decodes in about a second here.
    decode_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    max_faces: Annotated[int, Field(ge=1, le=1000)] = (
        20  # faces classified per image with faces=all: a crowd answers in bounded time
    )
    min_face_px: Annotated[int, Field(ge=1, le=10_000)] = (
        24  # faces whose box is smaller (in the upload's pixels) are not classified
    )
    # How long the faces of one batch upload may wait for their turn and room in the queue.
    batch_patience_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    # Video (docs/video.md): frames analysed per second of video (a request may ask for fewer);
    # the longest video taken; frames scaled down to this side before face detection (a face
    # YuNet finds at its smallest is still ~50 px to crop); how many seconds the exponential
    # average of each track's probabilities remembers.
    video_fps: Annotated[float, Field(gt=0, le=60)] = DEFAULT_FPS
    max_video_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    video_max_side: Annotated[int, Field(ge=64, le=8192)] = DEFAULT_MAX_SIDE
    video_smooth_s: Annotated[float, Field(ge=0, le=60)] = DEFAULT_SMOOTH_S
    # Pixels a video may make the decoder produce, all its frames together (every frame is
    # decoded, sampled or not): 120 s of 1080p at 30 frames/s is 7.5 G, about 40 s of decoding
    # on two cores; a 4K clip at 60 frames/s reaches it in 20 s.
    max_video_pixels: Annotated[int, Field(ge=1)] = 10_000_000_000
    # Wall time one video may take to decode, whatever it declares: 120 s of 1080p at 30
    # frames/s decodes in about 40 s on two cores. `fer video` allows an hour of local video.
    video_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    # Videos analysed at once, each on a video thread of its own (never on the prepare threads,
    # so photos keep their latency); more get 503. Uploads have their own cap (FER_MAX_VIDEO_UPLOADS).
    max_video_jobs: Annotated[int, Field(ge=1, le=64)] = 2


ENGINE_DEFAULTS = EngineConfig()

ENV_PREFIX = "FER_"


def engine_fields() -> tuple[str, ...]:
    """The engine's knobs, by field name (`FER_` + the name in upper case is its setting)."""
    return tuple(item.name for item in dataclasses.fields(EngineConfig))


def engine_values_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The engine knobs set in `environ` (`FER_MAX_FACES=3` → {"max_faces": "3"}), not yet checked."""
    return {name: environ[key] for name in engine_fields() if (key := ENV_PREFIX + name.upper()) in environ}


def engine_config(
    environ: Mapping[str, str], defaults: Mapping[str, Any] | None = None, **overrides: Any
) -> EngineConfig:
    """The engine's configuration: `overrides` (flags; None = not given), else `FER_*` in `environ`, else `defaults`.

    `defaults` are a caller's own where the environment says nothing (`fer video` takes longer
    videos than the service); beyond them, `EngineConfig`'s. Raises `pydantic.ValidationError`;
    `config_error_line` makes it one line naming the variables at fault.
    """
    values: dict[str, Any] = {**(defaults or {}), **engine_values_from_environ(environ)}
    values.update({name: value for name, value in overrides.items() if value is not None})
    return TypeAdapter(EngineConfig).validate_python(values)


def config_error_line(error: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """A validation error of the settings as one line naming what is at fault.

    The environment variable, or the command-line flag where `flags` (field → flag) says the
    value came from one.
    """
    parts = []
    for item in error.errors():
        # loc[0] is the field (the engine's knobs one level down in the service's settings); a
        # union type adds which member refused, which names no variable.
        loc = item["loc"][1:] if item["loc"][:1] == ("engine",) else item["loc"]
        field_name = str(loc[0]) if loc else ""
        if flags and field_name in flags:
            parts.append(f"{flags[field_name]} {item.get('input')!r}: {item['msg']}")
            continue
        name = f"{ENV_PREFIX}{field_name.upper()}" if loc else "FER_*"
        parts.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts)
