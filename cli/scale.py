"""`fer predict --engine ray`: the same engine over millions of files, on Ray Data.

The driver lists the work (a folder tree, or a CSV/Parquet manifest with a `path` column), drops
what an earlier run of the same output already wrote (`--resume`), and hands the paths to Ray
Data. Long-lived actors each load the checkpoint once and classify batches through the engine,
exactly as `fer predict` does; each batch becomes one Arrow table, and Ray writes the tables as
Parquet or CSV part files under the output folder, in parallel, as they come. A file that cannot
be read or decoded is a row with its error, never a failed job.

Ray and pyarrow come with the `scale` extra; this module imports them only when it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.checkpoint import load_checkpoint
from models.engine import Engine, EngineConfig, ImageAnswer
from models.errors import FerError
from models.predictor import Predictor
from models.runtime import Precision
from models.tta import ServedTta

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
MANIFEST_SUFFIXES = (".csv", ".parquet")
# The local cluster's shared-memory object store: it holds paths and result tables, a few MB a
# batch, never images (each actor reads its own files), so a small store leaves the RAM to the actors.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


class ScaleError(FerError):
    """A Ray run that cannot start: Ray missing, an output that exists, a manifest without paths."""

    status = 2


@dataclass(frozen=True)
class RayJob:
    """What one `fer predict --engine ray` run does."""

    inputs: tuple[Path, ...]  # folders, image files, or CSV/Parquet manifests with a `path` column
    output: Path  # a folder of part files, named like a file: results.parquet or results.csv
    checkpoint: Path
    precision: Precision = "auto"
    tta: ServedTta = "checkpoint"
    batch_size: int = 64
    workers: int | None = None  # None: as many as the cluster's CPUs allow at cpus_per_worker each
    cpus_per_worker: int = 1
    address: str | None = None  # an existing cluster; None starts a local one for this run
    resume: bool = False
    progress: bool = False


@dataclass(frozen=True)
class RayRun:
    """What a run did: files classified now, files skipped as already written, failures among the new."""

    classified: int
    skipped: int
    failed: int
    precision: str


def output_format(output: Path) -> str:
    """ "parquet" or "csv", from the output's name."""
    try:
        return OUTPUT_FORMATS[output.suffix.lower()]
    except KeyError:
        raise ScaleError(
            f"--output {output}: name it *.parquet or *.csv (a folder of part files in that format)"
        ) from None


def result_schema(classes: Sequence[str]) -> pa.Schema:
    """The columns of `fer predict --format csv`, typed: one float64 per class, nulls where a file failed."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("confidence", pa.float64()),
            *[(name, pa.float64()) for name in classes],
            ("face", pa.string()),  # "x y w h" in the photo's pixels, as in fer predict's CSV
            ("error", pa.string()),
        ]
    )


def result_columns(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, list[Any]]:
    """`fer predict`'s result rows (cli.main.result_row) as columns of `result_schema`."""
    columns: dict[str, list[Any]] = {name: [] for name in ("path", "label", "confidence", *classes, "face", "error")}
    for row in rows:
        probabilities = row.get("probabilities") or {}
        face = row.get("face")
        columns["path"].append(row["path"])
        columns["label"].append(row.get("label"))
        columns["confidence"].append(row.get("confidence"))
        for name in classes:
            columns[name].append(probabilities.get(name))
        columns["face"].append(" ".join(map(str, face)) if face else None)
        columns["error"].append(row.get("error"))
    return columns


class Classifier:
    """A Ray actor's work: the engine loaded once, then a batch of paths in, an Arrow table out."""

    def __init__(self, checkpoint: str, precision: str, tta: str, threads: int, batch_size: int) -> None:
        # One event loop for the actor's life: the engine keeps its admission queue per loop.
        self._loop = asyncio.new_event_loop()
        config = EngineConfig(
            precision=precision,  # type: ignore[arg-type]
            tta=tta,  # type: ignore[arg-type]
            threads=threads,
            prepare_workers=threads,
            max_batch=batch_size,
            queue_size=max(256, 2 * batch_size),
        )
        self._engine = Engine.load(Path(checkpoint), config)
        self._schema = result_schema(self._engine.classes)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import pyarrow as pa

        from cli.main import result_row

        blobs: list[bytes | OSError] = []
        for source in batch["source"]:
            try:
                blobs.append(Path(str(source)).read_bytes())
            except OSError as exc:
                blobs.append(exc)
        readable = [blob for blob in blobs if isinstance(blob, bytes)]
        answers: Iterable[ImageAnswer | Exception] = iter(
            self._loop.run_until_complete(self._engine.classify_batch(readable))
        )
        rows = [
            result_row(Path(str(path)), blob if isinstance(blob, OSError) else next(answers))  # type: ignore[call-overload]
            for path, blob in zip(batch["path"], blobs, strict=True)
        ]
        return pa.table(result_columns(rows, self._engine.classes), schema=self._schema)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()


def list_work(inputs: Sequence[Path]) -> list[tuple[str, str]]:
    """(path as written in the results, absolute path to read) for every image the inputs name.

    Folders and image files are listed as `fer predict` lists them. A manifest's paths are read
    relative to the manifest's own folder, so a manifest travels with its images.
    """
    from cli.main import iter_images

    work: list[tuple[str, str]] = []
    for item in inputs:
        if item.is_file() and item.suffix.lower() in MANIFEST_SUFFIXES:
            base = item.resolve().parent
            work += [(text, str(base / text)) for text in manifest_paths(item)]
        else:
            work += [(str(path), str(path.resolve())) for path in iter_images([item])]
    return work


def manifest_paths(manifest: Path) -> list[str]:
    """The `path` column of a CSV or Parquet manifest."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if manifest.suffix.lower() == ".csv":
            table = pyarrow.csv.read_csv(manifest, convert_options=pyarrow.csv.ConvertOptions(include_columns=["path"]))
        else:
            table = pyarrow.parquet.read_table(manifest, columns=["path"])
    except (KeyError, ValueError, OSError) as exc:  # pyarrow names a missing column with KeyError or ArrowInvalid
        raise ScaleError(f"manifest {manifest}: needs a `path` column of image paths ({exc})") from None
    return [str(value) for value in table.column("path").to_pylist() if value]


def written_rows(output: Path) -> dict[str, str]:
    """Path → error ("" for a result) of every row the runs so far wrote under `output`."""
    import pyarrow.dataset

    parts = (
        sorted(str(p) for p in output.iterdir() if p.suffix.lower() == output.suffix.lower()) if output.exists() else []
    )
    if not parts:
        return {}
    table = pyarrow.dataset.dataset(parts, format=output_format(output)).to_table(columns=["path", "error"])
    return {
        str(path): str(error or "")
        for path, error in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True)
    }


def resolve_precision(checkpoint: Path, precision: Precision) -> str:
    """`auto` decided once, here, so that every worker answers in the same precision, as one `fer predict` does."""
    if precision != "auto":
        return precision
    return Predictor(load_checkpoint(checkpoint), precision="auto").precision


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start a local one on this machine's CPUs (None)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call home from a batch job
    # Ray's C++ core logs notes such as how it restarts actors at ERROR on the driver's stderr;
    # real failures still reach this process as exceptions, and the cluster's logs keep everything.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
    else:
        ray.init(address=address, **options)


def run_on_ray(job: RayJob) -> RayRun:
    """Classify every listed file not yet in `job.output` on Ray Data; returns what was done."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScaleError("--engine ray needs Ray: pip install 'fer-service[scale]'") from None

    output_format(job.output)  # refuse a bad name before any work
    if job.output.exists() and any(job.output.iterdir()) and not job.resume:
        raise ScaleError(
            f"--output {job.output} already holds results: add --resume to classify only the files not in it, "
            "or name another output"
        )
    work = list_work(job.inputs)
    done = written_rows(job.output) if job.resume else {}
    pending = [(path, source) for path, source in work if path not in done]
    precision = resolve_precision(job.checkpoint, job.precision)
    if not pending:
        return RayRun(classified=0, skipped=len(work) - len(pending), failed=0, precision=precision)

    started_here = not ray.is_initialized()  # a caller that connected already keeps its cluster
    if started_here:
        connect(job.address)
    # Without a progress bar Ray Data would log each operator's state instead: only its warnings then.
    logging.getLogger("ray.data").setLevel(logging.INFO if job.progress else logging.ERROR)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = job.progress
        context.enable_operator_progress_bars = job.progress
        cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        workers = job.workers or max(1, cpus // job.cpus_per_worker)
        # A few blocks a worker, so that the last ones are shared out; a short resumed run may need
        # fewer workers than asked, so the pool starts at `workers` and may shrink to one.
        blocks = min(len(pending), max(workers, min(-(-len(pending) // job.batch_size), 4 * workers)))
        dataset = ray.data.from_items(
            [{"path": path, "source": source} for path, source in pending], override_num_blocks=blocks
        )
        results = dataset.map_batches(
            Classifier,
            fn_constructor_kwargs={
                "checkpoint": str(job.checkpoint.resolve()),
                "precision": precision,
                "tta": job.tta,
                "threads": job.cpus_per_worker,
                "batch_size": job.batch_size,
            },
            batch_size=job.batch_size,
            batch_format="numpy",
            concurrency=(1, workers, workers),
            num_cpus=job.cpus_per_worker,
        )
        job.output.mkdir(parents=True, exist_ok=True)
        target = str(job.output.resolve())
        # A part file per ~10,000 rows rather than per batch: fewer, larger files for what reads them next.
        if output_format(job.output) == "parquet":
            results.write_parquet(target, min_rows_per_file=10_000)
        else:
            results.write_csv(target, min_rows_per_file=10_000)
    finally:
        if started_here:
            ray.shutdown()
    written = written_rows(job.output)
    missing = [path for path, _ in pending if path not in written]
    if missing:  # Ray retries failed tasks; a row still missing means a write was lost
        raise ScaleError(f"{len(missing)} files have no row in {job.output}, e.g. {missing[0]}")
    failed = sum(1 for path, _ in pending if written[path])
    return RayRun(classified=len(pending), skipped=len(work) - len(pending), failed=failed, precision=precision)


def ray_predict_command(job: RayJob) -> int:
    """`fer predict --engine ray`: 0 unless every new file failed; a summary line on stderr."""
    run = run_on_ray(job)
    print(
        f"{run.classified} files classified ({run.failed} with an error), {run.skipped} already in "
        f"{job.output} skipped; precision {run.precision}",
        file=sys.stderr,
    )
    return 1 if run.classified and run.failed == run.classified else 0
