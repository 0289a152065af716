"""Export a checkpoint's network for other runtimes: TorchScript or ONNX (fp32, dynamic batch).

Needs torch (the `train` extra), imported when an export runs: `fer predict` imports this module
and must work without it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from models.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")


def export_network(checkpoint: Checkpoint, output: Path, export_format: str) -> Path:
    """Write the network (input `faces` (N, 1, 48, 48) float32, output `logits` (N, classes))."""
    import torch

    from models.network import fuse_for_inference

    network = fuse_for_inference(checkpoint.network)  # BatchNorm folded in: a smaller graph, same outputs
    size = checkpoint.preprocessing.size
    example = torch.zeros(2, 1, size, size)
    output.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "torchscript":
        # TorchScript is deprecated in torch 2.14 but still what C++ (libtorch) and many servers load.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(network, example)  # type: ignore[no-untyped-call]  # deprecated API, untyped in 2.14
        traced.save(str(output))
    elif export_format == "onnx":
        export_onnx(network, size, output)
    else:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {export_format!r}")
    logger.info("exported %s to %s", checkpoint.path, output)
    return output


def export_onnx(network: torch.nn.Module, size: int, output: Path) -> Path:
    """Write an eval-mode network as ONNX: input `faces` (N, 1, size, size) float32, output `logits`."""
    import torch

    output.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        network,
        (torch.zeros(2, 1, size, size),),
        str(output),
        dynamo=True,
        input_names=["faces"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    return output
