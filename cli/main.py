"""`fer predict | video | export | serve | train | evaluate | plots`.

`fer predict` classifies local files without a server, through the same preprocessing, face
detection and predictor as the service; `fer video` makes a video's emotion timeline
(cli/video.py). `train`, `evaluate` and `plots` hand their arguments to
`python -m training.*`; `serve` runs the service (settings from FER_* and the flags).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

from pydantic import ValidationError

from cli.engine_options import add_engine_flags, cli_engine_config
from cli.results import UNBOUNDED_REQUEST_PIXELS, classify_files, csv_columns, face_text, iter_images, result_row
from cli.storage import is_uri
from cli.video import add_video_parser, video_command
from models.checkpoint import load_checkpoint
from models.config import config_error_line, engine_config
from models.engine import Engine
from models.errors import FerError
from models.export import EXPORT_FORMATS, export_network
from training.helpformat import DefaultsHelpFormatter

PASS_THROUGH = ("train", "evaluate", "plots")


def progress_bar(total: int, enabled: bool) -> Any:
    """tqdm's bar on stderr when it is installed (the `train` extra); otherwise nothing is drawn."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(SimpleNamespace(update=lambda count: None))
    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr)


# `fer predict`'s own batch size where neither --batch-size nor FER_MAX_BATCH says: larger than
# the service's, since a folder of files is throughput work, not a lone request's latency.
PREDICT_BATCH = 64


def predict_command(args: argparse.Namespace) -> int:
    """`fer predict`: every file through the engine, written as it comes; 1 when every file failed."""
    if args.batch_size is not None and args.batch_size < 1:
        print(f"fer: --batch-size {args.batch_size}: give a whole number of at least 1", file=sys.stderr)
        return 2
    if args.engine == "ray":
        return ray_predict(args)
    ray_only = (args.address, args.workers, args.cpus_per_worker, args.resume or None)
    for flag, value in zip(("--address", "--workers", "--cpus-per-worker", "--resume"), ray_only, strict=True):
        if value is not None:
            print(f"fer: {flag} is for --engine ray", file=sys.stderr)
            return 2
    remote = next((name for name in (*args.paths, args.output or "") if is_uri(name)), None)
    if remote is not None:
        print(
            f"fer: {remote}: object storage is read and written by --engine ray (fer-service[scale])", file=sys.stderr
        )
        return 2
    config = cli_engine_config(
        args, {"max_batch": PREDICT_BATCH}, max_batch=args.batch_size, **UNBOUNDED_REQUEST_PIXELS
    )
    engine = Engine.load(config.checkpoint, config)
    files = list(iter_images([Path(path) for path in args.paths]))
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    out = Path(args.output).open("w", newline="") if args.output else sys.stdout  # noqa: SIM115  (closed below)

    async def run() -> int:
        with progress_bar(len(files), progress) as bar:

            async def rows() -> AsyncIterator[dict[str, Any]]:
                async for path, answer in classify_files(engine, files, in_flight=2 * config.max_batch):
                    bar.update(1)
                    yield result_row(str(path), answer)

            return await write_results(rows(), args.format or "jsonl", engine.model.classes, out)

    try:
        failures = asyncio.run(run())
    finally:
        engine.close()
        if args.output:
            out.close()
    return 1 if failures == len(files) and files else 0


def ray_predict(args: argparse.Namespace) -> int:
    """`fer predict --engine ray`: the same rows as Parquet or CSV part files, on a Ray cluster."""
    from cli.scale import RayJob, ray_predict_command

    if args.output is None:
        print("fer: --engine ray writes a folder of part files: name it with --output results.parquet", file=sys.stderr)
        return 2
    if args.format is not None:
        print(
            "fer: --engine ray takes its format from --output's name (.parquet or .csv), not --format", file=sys.stderr
        )
        return 2
    for flag, value in (("--workers", args.workers), ("--cpus-per-worker", args.cpus_per_worker)):
        if value is not None and value < 1:
            print(f"fer: {flag} {value}: give a whole number of at least 1", file=sys.stderr)
            return 2
    job = RayJob(
        inputs=tuple(args.paths),
        output=args.output,
        config=cli_engine_config(
            args, {"max_batch": PREDICT_BATCH}, max_batch=args.batch_size, **UNBOUNDED_REQUEST_PIXELS
        ),
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker or 1,
        address=args.address,
        resume=args.resume,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    return ray_predict_command(job)


async def write_results(
    results: AsyncIterator[dict[str, Any]], output_format: str, classes: Sequence[str], out: TextIO
) -> int:
    """Write results as JSON lines, CSV or a table; returns the number of failed files."""
    failures = 0
    writer = csv.writer(out) if output_format == "csv" else None
    if writer:
        writer.writerow(csv_columns(classes))
    elif output_format == "table":
        out.write(f"{'label':<9} {'conf':>5}  path\n")
    async for result in results:
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
                + [face_text(face) or "", result.get("error", "")]
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
    predict.add_argument(
        "paths",
        nargs="+",
        help="image files or folders (searched recursively); with --engine ray also URIs (s3://bucket/prefix)",
    )
    predict.add_argument(
        "--format", choices=("jsonl", "table", "csv"), default=None, help="output format (default: jsonl)"
    )
    predict.add_argument(
        "--output", default=None, help="write here instead of standard output; with --engine ray a folder or a URI"
    )
    predict.add_argument(
        "--batch-size", type=int, default=None,
        help=f"images per forward pass (default: $FER_MAX_BATCH or {PREDICT_BATCH})",
    )  # fmt: skip
    add_engine_flags(predict)
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when it is a terminal)",
    )

    scale = predict.add_argument_group(
        "on Ray (pip install 'fer-service[scale]')",
        "--engine ray classifies on a Ray cluster: long-lived workers that each load the model once, "
        "results written as part files under --output (results.parquet or results.csv), a failed file "
        "a row with its error. Paths in a CSV/Parquet manifest (a `path` column) are read relative to it.",
    )
    scale.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="local: this process; ray: a Ray cluster"
    )
    scale.add_argument(
        "--address", default=None, help="an existing Ray cluster (ray://host:10001 or auto); default: a local one"
    )
    scale.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers, each loading the model once (default: CPUs / cpus-per-worker)",
    )
    scale.add_argument(
        "--cpus-per-worker", type=int, default=None, help="CPUs (torch and decoding threads) per worker (default: 1)"
    )
    scale.add_argument("--resume", action="store_true", help="skip the files already in --output, from an earlier run")

    add_video_parser(commands, defaults)

    export = commands.add_parser("export", help="write the network as ONNX or TorchScript", formatter_class=defaults)
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="export format")
    export.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint to export (default: $FER_CHECKPOINT or the shipped one)",
    )
    export.add_argument("--output", type=Path, default=None, help="output file (default: model.onnx or model.pt)")

    serve = commands.add_parser("serve", help="run the HTTP service (FER_* settings apply)", formatter_class=defaults)
    serve.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to serve (sets FER_CHECKPOINT)")
    serve.add_argument("--host", default=None, help="bind address (sets FER_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (sets FER_PORT)")
    for name in PASS_THROUGH:
        commands.add_parser(name, help=f"python -m training.{name} (see fer {name} --help)", add_help=False)
    commands.add_parser("keys", help="API keys: fer keys add NAME, fer keys list (python -m app.keys)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fer`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "keys":  # the service's own tool, run as the service would run it
        return subprocess.call([sys.executable, "-m", "app.keys", *argv[1:]])
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        module = importlib.import_module(f"training.{argv[0]}")
        return int(module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "predict":
            return predict_command(args)
        if args.command == "video":
            return video_command(args)
        if args.command == "export":
            output = args.output or Path("model.onnx" if args.format == "onnx" else "model.pt")
            checkpoint = args.checkpoint or engine_config(os.environ).checkpoint  # FER_CHECKPOINT, as the service
            try:
                export_network(load_checkpoint(checkpoint), output, args.format)
            except ModuleNotFoundError as exc:  # torch, onnx: the extras
                print(f"fer: export needs {exc.name}: pip install 'fer-service[train,export]'", file=sys.stderr)
                return 2
            print(f"wrote {output}")
            return 0
        if args.command == "serve":
            for key, value in (("CHECKPOINT", args.checkpoint), ("HOST", args.host), ("PORT", args.port)):
                if value is not None:
                    os.environ[f"FER_{key}"] = str(value)
            # `python -m app` in this process's place: it sets up its own allocator (app/__main__.py).
            os.execv(sys.executable, [sys.executable, "-m", "app"])
    except FerError as exc:
        print(f"fer: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # an invalid FER_* variable or flag value
        print(f"fer: {config_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (the Ray engine's --resume continues it)
        print("fer: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
