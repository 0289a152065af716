"""The torch forward paths (fp32, bf16 autocast), and training's bf16 rule; the one serving module that imports torch.

The service imports this only when torch serves (`FER_RUNTIME=torch`, bf16, or "auto" timing
the torch paths where torch is installed); ONNX Runtime serves without it (`models/precision.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from models.checkpoint import Checkpoint
from models.network import fuse_for_inference
from models.precision import cpu_supports_bf16


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


def inference_network(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network as served: BatchNorm folded, Dropout dropped, channels_last.

    channels_last: bf16 convolutions in oneDNN run about 2× faster in NHWC (benchmarks/infer.py).
    """
    return fuse_for_inference(checkpoint.network).to(torch.device("cpu")).to(memory_format=torch.channels_last)


def torch_forward(network: nn.Module, precision: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised faces (N, 1, size, size) float32 → float32 logits through `network` in fp32 or bf16.

    Sets torch's thread count for the process, as the engine's other thread settings are.
    """
    torch.set_num_threads(max(1, threads))
    device = torch.device("cpu")

    def forward(faces: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(np.ascontiguousarray(faces, dtype=np.float32))
        with torch.inference_mode(), autocast(device, precision == "bf16"):
            logits: torch.Tensor = network(inputs.contiguous(memory_format=torch.channels_last))
            result: np.ndarray = logits.float().numpy()
            return result

    return forward
