"""The int8 forward path: the checkpoint's network quantised for ONNX Runtime, and its file's tie to the checkpoint.

`python -m training.quantize` writes `<checkpoint>.int8.onnx` beside a checkpoint (static
quantisation calibrated on `train/`); this module loads it and runs it. The file carries the
SHA-256 of the weights it was quantised from (`weights_sha256`, not the checkpoint file's hash,
which changes whenever `training.evaluate` stores figures in it), so a file left over from other
weights is refused instead of served.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import CheckpointError

logger = logging.getLogger(__name__)

INT8_SUFFIX = ".int8.onnx"
# The metadata keys the quantised file carries (ONNX `metadata_props`).
WEIGHTS_KEY = "fer.weights_sha256"
RECIPE_KEY = "fer.quantisation"


def int8_model_path(checkpoint_path: Path) -> Path:
    """Where a checkpoint's quantised network lives: beside it, `checkpoint.pth` → `checkpoint.int8.onnx`."""
    return checkpoint_path.with_suffix(INT8_SUFFIX)


def weights_sha256(network: nn.Module) -> str:
    """A hash of the weights alone (names, dtypes, shapes, values), stable across metric updates."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Int8Network:
    """The quantised network in an ONNX Runtime session: normalised faces → fp32 logits.

    Raises `CheckpointError` (one line) when the file is missing, unreadable, was quantised from
    other weights, or answers in the wrong shape.
    """

    def __init__(self, path: Path, *, expected_weights: str, num_classes: int, size: int, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise CheckpointError(f"int8 model {path}: ONNX Runtime is not installed ({exc})") from None

        if not path.is_file():
            checkpoint = path.with_name(path.name.removesuffix(INT8_SUFFIX) + ".pth")
            raise CheckpointError(
                f"int8 model {path}: no such file (python -m training.quantize --checkpoint {checkpoint} makes it)"
            )
        options = ort.SessionOptions()
        # The service's threads, as for torch: more than the cores only adds contention.
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT threads sleep instead of spinning: they share the cores with the threads that
        # decode photos and parse requests (and measured no slower: 3,649 faces/s at batch 32 vs 3,204).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # ORT's warnings about unused initialisers are not ours to fix
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind exception types for every kind of bad file
            first = str(exc).replace("\n", " ")[:200]
            raise CheckpointError(f"int8 model {path}: ONNX Runtime cannot load it ({first})") from None
        metadata: dict[str, Any] = dict(self._session.get_modelmeta().custom_metadata_map)
        found = metadata.get(WEIGHTS_KEY)
        if found != expected_weights:
            said = f"weights {found[:12]}" if found else "no weights hash"
            raise CheckpointError(
                f"int8 model {path}: quantised from other weights ({said}, the checkpoint has {expected_weights[:12]}); "
                "run python -m training.quantize again"
            )
        self.path = path
        self.recipe = str(metadata.get(RECIPE_KEY, ""))
        self._input = self._session.get_inputs()[0].name
        probe = self(torch.zeros(2, 1, size, size))
        if probe.shape != (2, num_classes) or not bool(torch.isfinite(probe).all()):
            raise CheckpointError(
                f"int8 model {path}: answers {tuple(probe.shape)} for 2 faces, not (2, {num_classes}) finite logits"
            )

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 1, 48, 48) float32 → (N, classes) float32 logits; ORT's session is safe to call from threads."""
        array = np.ascontiguousarray(faces.detach().to("cpu", torch.float32).numpy())
        (logits,) = self._session.run(None, {self._input: array})
        return torch.from_numpy(logits)
