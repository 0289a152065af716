"""`fer predict | export | serve | train | evaluate | plots`.

`fer predict` classifies local files without a server, through the same preprocessing, face
detection and predictor as the service. `train`, `evaluate` and `plots` hand their arguments to
`python -m training.*`; `serve` runs the service (settings from FER_* and the flags).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from models.checkpoint import load_checkpoint
from models.engine import FaceInput, prepare_faces
from models.errors import FerError
from models.export import EXPORT_FORMATS, export_network
from models.faces import FaceDetector
from models.predictor import TTA_MODES, Predictor
from training.helpformat import DefaultsHelpFormatter

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "checkpoint.pth"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
PASS_THROUGH = ("train", "evaluate", "plots")


def iter_images(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given, and the images under directories, recursively, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def predict_files(predictor: Predictor, files: list[Path], batch_size: int, progress: bool) -> Iterator[dict[str, Any]]:
    """One result dict per file, in order; unreadable files get an "error"."""
    detector = FaceDetector()
    spec = predictor.checkpoint.preprocessing
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        prepared: list[tuple[Path, FaceInput | str]] = []
        for path in chunk:
            try:
                prepared.append((path, prepare_faces(path.read_bytes(), detector, spec)[0]))
            except (FerError, OSError) as exc:
                prepared.append((path, str(exc)))
        inputs = [item for _, item in prepared if isinstance(item, FaceInput)]
        rows = iter(predictor.predict_tensors(torch.stack([f.inputs for f in inputs])) if inputs else [])
        for path, item in prepared:
            if isinstance(item, str):
                yield {"path": str(path), "error": item}
                continue
            prediction = predictor.to_predictions(next(rows)[None, :])[0]
            yield {
                "path": str(path),
                "label": prediction.label,
                "confidence": prediction.confidence,
                "probabilities": prediction.probabilities,
                "face": item.box.as_list() if item.box else None,
            }
        bar.update(len(chunk))
    bar.close()


def write_results(results: Iterator[dict[str, Any]], output_format: str, classes: Sequence[str], out: TextIO) -> int:
    """Write results as JSON lines, CSV or a table; returns the number of failed files."""
    failures = 0
    writer = csv.writer(out) if output_format == "csv" else None
    if writer:
        writer.writerow(["path", "label", "confidence", *classes, "face", "error"])
    elif output_format == "table":
        out.write(f"{'label':<9} {'conf':>5}  path\n")
    for result in results:
        failures += "error" in result
        if output_format == "jsonl":
            out.write(json.dumps(result) + "\n")
        elif writer:
            probabilities = result.get("probabilities", {})
            face = result.get("face")
            writer.writerow(
                [
                    result["path"],
                    result.get("label", ""),
                    f"{result.get('confidence', 0):.4f}" if "label" in result else "",
                ]
                + [f"{probabilities[c]:.4f}" if probabilities else "" for c in classes]
                + [" ".join(map(str, face)) if face else "", result.get("error", "")]
            )
        elif "error" in result:
            out.write(f"{'error':<9} {'':>5}  {result['path']}: {result['error']}\n")
        else:
            out.write(f"{result['label']:<9} {result['confidence']:>5.2f}  {result['path']}\n")
    return failures


def build_parser() -> argparse.ArgumentParser:
    """The `fer` command and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="fer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = DefaultsHelpFormatter

    predict = commands.add_parser(
        "predict", help="classify local images or folders, no server needed", formatter_class=defaults
    )
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    predict.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint to use")
    predict.add_argument("--format", choices=("jsonl", "table", "csv"), default="jsonl", help="output format")
    predict.add_argument("--output", type=Path, default=None, help="write here instead of standard output")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="forward-pass precision")
    predict.add_argument(
        "--tta",
        choices=("checkpoint", *TTA_MODES),
        default="checkpoint",
        help="test-time augmentation: tencrop averages ten views of each face, more accurate and about ten "
        "times the model time (docs/tta.md); checkpoint: the mode its stored metrics were measured with",
    )
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when it is a terminal)",
    )

    export = commands.add_parser("export", help="write the network as ONNX or TorchScript", formatter_class=defaults)
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="export format")
    export.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint to export")
    export.add_argument("--output", type=Path, default=None, help="output file (default: model.onnx or model.pt)")

    serve = commands.add_parser("serve", help="run the HTTP service (FER_* settings apply)", formatter_class=defaults)
    serve.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to serve (sets FER_CHECKPOINT)")
    serve.add_argument("--host", default=None, help="bind address (sets FER_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (sets FER_PORT)")
    for name in PASS_THROUGH:
        commands.add_parser(name, help=f"python -m training.{name} (see fer {name} --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fer`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        module = importlib.import_module(f"training.{argv[0]}")
        return int(module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "predict":
            tta = None if args.tta == "checkpoint" else args.tta
            predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, tta=tta)
            files = list(iter_images(args.paths))
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            out = args.output.open("w", newline="") if args.output else sys.stdout
            try:
                failures = write_results(
                    predict_files(predictor, files, args.batch_size, progress), args.format, predictor.classes, out
                )
            finally:
                if args.output:
                    out.close()
            return 1 if failures == len(files) and files else 0
        if args.command == "export":
            output = args.output or Path("model.onnx" if args.format == "onnx" else "model.pt")
            export_network(load_checkpoint(args.checkpoint), output, args.format)
            print(f"wrote {output}")
            return 0
        if args.command == "serve":
            for key, value in (("CHECKPOINT", args.checkpoint), ("HOST", args.host), ("PORT", args.port)):
                if value is not None:
                    os.environ[f"FER_{key}"] = str(value)
            from app.__main__ import main as serve_main

            return serve_main()
    except FerError as exc:
        print(f"fer: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
