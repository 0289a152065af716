"""The ONNX Runtime forward paths: the checkpoint's network as fp32 and int8 ONNX files, and their tie to it.

`python -m training.quantize` writes two files beside a checkpoint: `<checkpoint>.onnx`, the fp32
network (BatchNorm folded), and `<checkpoint>.int8.onnx`, its static quantisation calibrated on
`train/`. This module loads and runs them, with numpy in and out and no torch. Each file carries
the SHA-256 of the weights it was made from (`models.checkpoint.weights_sha256`, not the
checkpoint file's hash, which changes whenever `training.evaluate` stores figures in it), so a
file left over from other weights, or from another checkpoint, is refused instead of served.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import CheckpointError

logger = logging.getLogger(__name__)

# ONNX Runtime 1.32 collects telemetry on Linux by default and, where it cannot write its device
# ID (a read-only container), warns on stderr at every start. An offline service sends none; the
# variable must be set before onnxruntime is first imported, which happens in this module.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# The precisions served from ONNX files, and each file's name beside `checkpoint.pth`.
ONNX_SUFFIXES = {"fp32": ".onnx", "int8": ".int8.onnx"}
# The metadata keys each file carries (ONNX `metadata_props`).
WEIGHTS_KEY = "fer.weights_sha256"
RECIPE_KEY = "fer.quantisation"  # how the int8 file was made; the fp32 file says "fp32 export"


def onnx_model_path(checkpoint_path: Path, precision: str) -> Path:
    """Where a checkpoint's ONNX file of `precision` lives: `checkpoint.pth` → `checkpoint.onnx` / `checkpoint.int8.onnx`."""
    return checkpoint_path.with_suffix(ONNX_SUFFIXES[precision])


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def quiet_session_options(threads: int) -> Any:
    """ONNX Runtime's session options for a model that shares the cores with the service's other threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The service's threads, as for torch: more than the cores only adds contention.
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads sleep instead of spinning: they share the cores with the threads that
    # decode photos and parse requests (and measured no slower: 3,649 faces/s at batch 32 vs 3,204).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # ORT's warnings about unused initialisers are not ours to fix
    return options


class OnnxNetwork:
    """One ONNX file in an ONNX Runtime session: normalised faces (N, 1, size, size) float32 → fp32 logits.

    Raises `CheckpointError` (one line) when the file is missing, unreadable, was made from other
    weights, or answers in the wrong shape.
    """

    def __init__(
        self, path: Path, *, precision: str, expected_weights: str, num_classes: int, size: int, threads: int
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise CheckpointError(f"{precision} model {path}: ONNX Runtime is not installed ({exc})") from None

        if not path.is_file():
            checkpoint = path.with_name(path.name.removesuffix(ONNX_SUFFIXES[precision]) + ".pth")
            raise CheckpointError(
                f"{precision} model {path}: no such file (python -m training.quantize --checkpoint {checkpoint} makes it)"
            )
        try:
            self._session = ort.InferenceSession(
                str(path), quiet_session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own pybind exception types for every kind of bad file
            first = str(exc).replace("\n", " ")[:200]
            raise CheckpointError(f"{precision} model {path}: ONNX Runtime cannot load it ({first})") from None
        metadata: dict[str, Any] = dict(self._session.get_modelmeta().custom_metadata_map)
        found = metadata.get(WEIGHTS_KEY)
        if found != expected_weights:
            said = f"weights {found[:12]}" if found else "no weights hash"
            raise CheckpointError(
                f"{precision} model {path}: made from other weights ({said}, the checkpoint has {expected_weights[:12]}); "
                "run python -m training.quantize again"
            )
        self.path = path
        self.precision = precision
        self.recipe = str(metadata.get(RECIPE_KEY, ""))
        self._input = self._session.get_inputs()[0].name
        probe = self(np.zeros((2, 1, size, size), np.float32))
        if probe.shape != (2, num_classes) or not bool(np.isfinite(probe).all()):
            raise CheckpointError(
                f"{precision} model {path}: answers {tuple(probe.shape)} for 2 faces, not (2, {num_classes}) finite logits"
            )

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        """(N, 1, size, size) float32 → (N, classes) float32 logits; ORT's session is safe to call from threads."""
        (logits,) = self._session.run(None, {self._input: np.ascontiguousarray(faces, dtype=np.float32)})
        result: np.ndarray = logits
        return result
