"""Write a checkpoint's ONNX Runtime files: the fp32 network, and its int8 quantisation calibrated on training images only.

python -m training.quantize --checkpoint models/checkpoint.pth

Writes `<checkpoint>.onnx` (fp32) and `<checkpoint>.int8.onnx` beside the checkpoint, what the
service serves without torch (models/onnx_network.py), each tagged with the hash of the weights
it came from. The fp32 file computes what torch's fp32 does (tests/test_runtimes.py holds it to
1e-5 per probability on val), so the checkpoint's fp32 figures describe it. Then measure the
int8 file on val and store its figures, so that `auto` may serve it:

python -m training.evaluate --precision int8 --also-tta flip --also-tta tencrop --write-metrics ...

The recipe, chosen by measurement on FER2013 val (docs/int8.md): static QDQ quantisation with
per-channel int8 weights and uint8 activations, ranges from the 99.999th percentile of 256
training faces, ReLU kept right after each convolution so that ONNX Runtime fuses the pair.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Checkpoint, drop_figures, load_checkpoint
from models.errors import FerError
from models.export import export_onnx
from models.network import fuse_for_inference
from models.onnx_network import RECIPE_KEY, WEIGHTS_KEY, OnnxNetwork, onnx_model_path
from models.preprocessing import to_model_input
from training.data import default_data_dir, load_split
from training.helpformat import DefaultsHelpFormatter

logger = logging.getLogger(__name__)


def calibration_faces(pixels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` faces drawn without replacement (seeded) from a split's pixels."""
    if count > len(pixels):
        raise ValueError(f"asked for {count} calibration images from a split of {len(pixels)}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(pixels), count, replace=False))
    return pixels[chosen]


def quantise(checkpoint: Checkpoint, calibration: torch.Tensor, output: Path, percentile: float) -> str:
    """Write the int8 model of a checkpoint to `output`, calibrated on normalised faces; returns its recipe line."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    weights = checkpoint.weights_sha256
    network = fuse_for_inference(checkpoint.network, pool_before_relu=False)
    batches = [{"faces": chunk.numpy()} for chunk in torch.split(calibration, 64)]

    class Faces(CalibrationDataReader):  # type: ignore[misc]  # ORT's base class is untyped
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    recipe = (
        f"onnxruntime {__import__('onnxruntime').__version__} static QDQ, per-channel int8 weights, uint8 activations, "
        f"percentile {percentile} calibration on {len(calibration)} train faces"
    )
    with tempfile.TemporaryDirectory(prefix="fer-quantise-") as work:
        fp32 = export_onnx(network, checkpoint.preprocessing.size, Path(work) / "fp32.onnx")
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantised = Path(work) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantised),
            Faces(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": percentile},
        )
        model = onnx.load(str(quantised))
        onnx.helper.set_model_props(model, {WEIGHTS_KEY: weights, RECIPE_KEY: recipe})
        staged = Path(work) / "tagged.onnx"
        onnx.save(model, str(staged))
        _install(staged, output, checkpoint, "int8")
    return recipe


def write_fp32(checkpoint: Checkpoint, output: Path) -> str:
    """Write the fp32 ONNX file of a checkpoint (BatchNorm folded, as torch serves it) to `output`; returns its recipe line."""
    import onnx

    recipe = f"fp32 export from torch {torch.__version__} (BatchNorm folded)"
    with tempfile.TemporaryDirectory(prefix="fer-export-") as work:
        exported = export_onnx(
            fuse_for_inference(checkpoint.network), checkpoint.preprocessing.size, Path(work) / "fp32.onnx"
        )
        model = onnx.load(str(exported))  # the exporter may keep weights in a side file: load them in
        onnx.helper.set_model_props(model, {WEIGHTS_KEY: checkpoint.weights_sha256, RECIPE_KEY: recipe})
        staged = Path(work) / "tagged.onnx"
        onnx.save(model, str(staged))
        _install(staged, output, checkpoint, "fp32")
    return recipe


def _install(staged: Path, output: Path, checkpoint: Checkpoint, precision: str) -> None:
    """Load `staged` the way the service will (hash, runtime, output shape), then put it in place atomically."""
    OnnxNetwork(
        staged,
        precision=precision,
        expected_weights=checkpoint.weights_sha256,
        num_classes=len(checkpoint.classes),
        size=checkpoint.preprocessing.size,
        threads=1,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(fd)
    try:
        Path(tmp_name).write_bytes(staged.read_bytes())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m training.quantize",
        description="Quantise a checkpoint's network to int8 (ONNX Runtime), calibrated on training images.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to quantise")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root (default: $FER2013_DIR or ../shared/datasets/fer2013)"
    )
    parser.add_argument("--split", default="train", help="sub-folder to calibrate on: never the split you measure on")
    parser.add_argument("--images", type=int, default=256, help="calibration images, drawn at random from --split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    parser.add_argument("--percentile", type=float, default=99.999, help="activation range: this percentile of |x|")
    parser.add_argument("--output", type=Path, default=None, help="int8 model file (default: beside the checkpoint)")
    parser.add_argument(
        "--fp32-only", action="store_true", help="write the fp32 file only (no calibration, no dataset needed)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="decode cache folder (default: none, decode every file)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.split in ("val", "test"):
        print(
            f"error: calibrate on training images, not {args.split}: that is what the figures are measured on",
            file=sys.stderr,
        )
        return 2
    output = args.output or onnx_model_path(args.checkpoint, "int8")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        fp32_output = onnx_model_path(args.checkpoint, "fp32")
        print(f"wrote {fp32_output}: {write_fp32(checkpoint, fp32_output)}")
        if args.fp32_only:
            return 0
        spec = checkpoint.preprocessing
        split = load_split((args.data_dir or default_data_dir()) / args.split, spec, cache_dir=args.cache_dir)
        faces = calibration_faces(split.pixels, args.images, args.seed)
        recipe = quantise(checkpoint, to_model_input(torch.from_numpy(faces), spec), output, args.percentile)
    except (FerError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {recipe}")
    if output.resolve() == onnx_model_path(args.checkpoint, "int8").resolve() and drop_figures(args.checkpoint, "int8"):
        # The stored int8 figures described the previous file: auto must not serve this one on them.
        print(
            "dropped the checkpoint's int8 figures, which described the previous file; measure this one with "
            f"python -m training.evaluate --checkpoint {args.checkpoint} --precision fp32 --also-precision int8 "
            "--write-metrics (auto serves int8 only once they are stored)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
