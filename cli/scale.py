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
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.results import classify_files, csv_columns, face_text, read_image_file, result_row
from cli.storage import (
    ScaleError,
    first_line,
    is_uri,
    list_work,
    open_place,
    output_format,
    read_object,
    result_schema,
    written_rows,
)
from models.answers import ImageAnswer
from models.checkpoint import load_checkpoint
from models.config import EngineConfig
from models.engine import Engine
from models.precision import resolve_precision

if TYPE_CHECKING:
    import pyarrow as pa

# The local cluster's shared-memory object store: it holds the list of paths and the result tables,
# never images (each actor reads its own files), so a small store leaves the RAM to the actors; Ray
# spills to disk past it. (The driver holds every path listed, about 100 bytes each.)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
ADDRESS_TIMEOUT_S = 5.0  # how long a cluster's address may take to accept a connection
ROWS_PER_PART_FILE = 10_000  # fewer, larger files for what reads them next, rather than one per batch
# Reads of object storage in flight per worker: at most this many objects of up to
# LARGE_OBJECT_BYTES, and one larger (up to MAX_FILE_BYTES) at a time (cli/storage.read_object).
OBJECT_READS_AHEAD = 8


# Lines Ray adds around a task's error: advice on retries and tracebacks, not the cause.
_RAY_NOISE = ("Traceback", "File ", "To change retry attempts", "ray.", "The above exception", "During handling")


def failure_reason(exc: BaseException) -> str:
    """The root cause of a failed Ray job, in one line: the innermost error's own message, not Ray's advice.

    A task's error reaches the driver wrapped (a RayTaskError whose `cause` is the original,
    inside Ray Data's own exceptions), and its text ends with hints such as "To change retry
    attempts…", which is what the last line used to quote.
    """
    seen: set[int] = set()
    innermost = exc
    while id(innermost) not in seen:
        seen.add(id(innermost))
        inner = getattr(innermost, "cause", None) or innermost.__cause__
        if not isinstance(inner, BaseException):
            break
        innermost = inner
    for candidate in (innermost, exc):
        lines = [line.strip() for line in str(candidate).splitlines() if line.strip()]
        meaningful = [line for line in lines if not line.startswith(_RAY_NOISE)]
        if meaningful:
            return f"{type(candidate).__name__}: {meaningful[-1]}" if candidate is innermost else meaningful[-1]
    return type(innermost).__name__


@dataclass(frozen=True)
class RayJob:
    """What one `fer predict --engine ray` run does."""

    inputs: tuple[str, ...]  # folders, image files, CSV/Parquet manifests with a `path` column; paths or URIs
    output: str  # a folder of part files named like a file (results.parquet, results.csv); a path or a URI
    config: EngineConfig  # the engine each worker runs: checkpoint, precision, TTA, detector, limits, batch size
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
    repeated: int = 0  # rows in the output that repeat a path (a retried block written twice)


def result_table(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> pa.Table:
    """`fer predict`'s result rows (cli.results.result_row) as one table of `result_schema`."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in csv_columns(classes)}
    for row in rows:
        probabilities = row.get("probabilities") or {}
        columns["path"].append(row["path"])
        columns["label"].append(row.get("label"))
        columns["confidence"].append(row.get("confidence"))
        for name in classes:
            columns[name].append(probabilities.get(name))
        columns["face"].append(face_text(row.get("face")))
        columns["error"].append(row.get("error"))
    return pa.table(columns, schema=result_schema(classes))


class Classifier:
    """A Ray actor's work: the engine loaded once, then a batch of paths in, an Arrow table out."""

    def __init__(self, config: EngineConfig) -> None:
        """`config`: the driver's, as the driver's environment and flags made it, with the precision resolved."""
        # One event loop for the actor's life: the engine keeps its turns for the queue per loop.
        self._loop = asyncio.new_event_loop()
        self._engine = Engine.load(config.checkpoint, config)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        sources = [str(source) for source in batch["source"]]
        # Object storage answers each read after a round trip: a few reads wait on the network at
        # once, ahead of the engine. A local file is read when its turn comes, as `fer predict` does.
        remote = any(is_uri(source) for source in sources)

        async def answers() -> list[ImageAnswer | Exception]:
            files = classify_files(
                self._engine, sources, read=read_source, read_ahead=OBJECT_READS_AHEAD if remote else 0
            )
            return [answer async for _, answer in files]

        # The path exactly as listed (a manifest's own text): it is what --resume matches on.
        rows = [
            result_row(str(path), answer)
            for path, answer in zip(batch["path"], self._loop.run_until_complete(answers()), strict=True)
        ]
        return result_table(rows, self._engine.model.classes)


def read_source(source: str) -> bytes | OSError:
    """A listed file's bytes: through its filesystem for a URI, else from the local file."""
    return read_object(source) if is_uri(source) else read_image_file(Path(source))


def resolve_model(config: EngineConfig) -> tuple[str, str, tuple[str, ...]]:
    """The precision and runtime every worker runs in and the checkpoint's classes, decided once, here.

    `auto` is timed on this machine (`resolve_precision`, as the predictor does), so that every
    worker answers in the same precision, as one `fer predict` does. The checkpoint is loaded
    either way: a bad one is refused here in one line, not in every actor.
    """
    loaded = load_checkpoint(config.checkpoint)
    path = resolve_precision(loaded, config.precision, config.threads, config.runtime).path
    return path.precision, path.runtime, loaded.classes


def connect(address: str | None, token: str | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one on this machine's CPUs (None).

    `token`: where `use_cluster_token` found the cluster's token, called before Ray was imported.
    """
    quiet_ray()
    import ray

    # Ray's own notices (token authentication on, its deprecations) are not the user's business here.
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address is None:
            # "local": a new cluster even where RAY_ADDRESS or a `ray start` names another one.
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
        else:
            ray.init(address=address, **options)
    except Exception as exc:  # Ray's own start-up and connection errors are of many kinds
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        if address is not None:
            # Ray's exception does not say that the cluster refused the token (only its C++ log
            # does): what to check goes with it, in the same line.
            raise ScaleError(f"could not join {where}: {first_line(exc)}; {token_advice(token)}") from None
        raise ScaleError(f"could not start {where}: {first_line(exc)}") from None


def quiet_ray() -> None:
    """Ray's settings for a batch job, set before Ray is first imported (it reads some of them then)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call home from a batch job
    # Ray's C++ core logs notes such as how it restarts actors, or a refused token, at WARNING and
    # ERROR on the driver's stderr; real failures still reach this process as exceptions (said in
    # one line by `connect`), and the cluster's logs keep everything.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")


# Where Ray looks for a cluster's token (Ray 2.59+ turns token authentication on for clusters that
# `ray start --head` makes, and writes the token to the default file on the head's machine).
TOKEN_VARIABLE, TOKEN_PATH_VARIABLE, AUTH_MODE_VARIABLE = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


def default_token_file() -> Path:
    """Ray's default token file, `~/.ray/auth_token`."""
    return Path.home() / ".ray" / "auth_token"


def use_cluster_token() -> str | None:
    """Turn Ray's token authentication on for joining a cluster when a token is where Ray looks for one.

    Ray does this for a cluster it starts, but a driver joining one with `ray.init(address=...)`
    sends no token unless `RAY_AUTH_MODE=token` is set, and the cluster refuses it. An explicit
    `RAY_AUTH_MODE` is left as it is. Returns where the token was found (None: nowhere).
    """
    if os.environ.get(TOKEN_VARIABLE):
        found: str | None = f"${TOKEN_VARIABLE}"
    elif (path := os.environ.get(TOKEN_PATH_VARIABLE)) and Path(path).is_file():
        found = path
    elif default_token_file().is_file():
        found = str(default_token_file())
    else:
        found = None
    if found is not None:
        os.environ.setdefault(AUTH_MODE_VARIABLE, "token")
    return found


def token_advice(token: str | None) -> str:
    """What to check when joining failed: the cluster's token authentication, in one clause."""
    if token is None:
        return (
            "if the cluster uses token authentication (Ray 2.59+ turns it on for `ray start --head`), no token "
            f"was found here: set {TOKEN_VARIABLE}, or {TOKEN_PATH_VARIABLE} to a file holding it, or copy the "
            f"head's {default_token_file()} to this machine (`ray get-auth-token` prints it on the head)"
        )
    return (
        f"if the cluster uses token authentication, the token from {token} is not its own "
        "(`ray get-auth-token` on the head prints the right one)"
    )


def check_reachable(address: str) -> None:
    """Refuse, in seconds, an address nothing answers at: Ray itself retries such a connection for minutes."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ScaleError(f"--address {address}: give host:port (the head's GCS, 6379) or ray://host:10001, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise ScaleError(f"--address {address}: no Ray cluster answers there ({exc})") from None


def plan_workers(job: RayJob) -> int:
    """How many actors to run: `job.workers`, or as many as the cluster's CPUs allow; refuses a size no node fits."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    largest_node = max((int(node.get("Resources", {}).get("CPU", 0)) for node in nodes), default=0)
    # An autoscaling cluster may have no worker node up yet (and a head without CPUs): let Ray start one.
    if largest_node and job.cpus_per_worker > largest_node:
        raise ScaleError(
            f"--cpus-per-worker {job.cpus_per_worker}: the largest node of this cluster has {largest_node} CPUs, "
            "so no worker could ever start"
        )
    cpus = int(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]
    return job.workers or max(1, cpus // job.cpus_per_worker)


def run_on_ray(job: RayJob) -> RayRun:
    """Classify every listed file not yet in `job.output` on Ray Data; returns what was done."""
    # Before Ray is imported: it reads RAY_AUTH_MODE and its log level once, when it loads.
    quiet_ray()
    token = None if job.address is None else use_cluster_token()
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScaleError("--engine ray needs Ray: pip install 'fer-service[scale]'") from None

    output = open_place(job.output)
    output_format(output)  # refuse a bad name before any work
    output.check_bucket()
    kind = output.file_type()
    if kind == "file":
        raise ScaleError(
            f"--output {job.output} is a file: --engine ray writes a folder of part files, name one that is not a file"
        )
    if kind == "directory" and output.children() and not job.resume:
        raise ScaleError(
            f"--output {job.output} already holds results: add --resume to classify only the files not in it, "
            "or name another output"
        )
    if job.address is not None and not ray.is_initialized():
        check_reachable(job.address)
    listed = list_work(job.inputs)
    work = dict(listed)  # a file named twice is classified once
    if len(work) < len(listed):
        sources: dict[str, set[str]] = {}
        for path, source in listed:
            sources.setdefault(path, set()).add(source)
        clash = next((path for path, found in sources.items() if len(found) > 1), None)
        if clash is not None:
            raise ScaleError(
                f"{clash} names two different files (two manifests in different folders?): list absolute paths"
            )
    if not work:
        raise ScaleError(f"no images in {', '.join(map(str, job.inputs))}: nothing to classify")
    precision, runtime, classes = resolve_model(job.config)
    batch_size = job.config.max_batch
    done = written_rows(output, classes)[0] if job.resume else {}
    pending = [(path, source) for path, source in work.items() if path not in done]
    if not pending:
        return RayRun(classified=0, skipped=len(work), failed=0, precision=precision)
    try:
        if output.is_local:  # an object store's prefixes need no creating (and a marker per parent may be refused)
            output.filesystem.create_dir(output.path, recursive=True)
    except OSError as exc:
        raise ScaleError(f"--output {job.output}: cannot create it ({first_line(exc)})") from None

    started_here = not ray.is_initialized()  # a caller that connected already keeps its cluster
    if started_here:
        connect(job.address, token)
    # Without a progress bar Ray Data would log each operator's state instead: only its warnings then.
    logging.getLogger("ray.data").setLevel(logging.INFO if job.progress else logging.ERROR)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = job.progress
        context.enable_operator_progress_bars = job.progress
        workers = plan_workers(job)
        # A few blocks a worker, so that the last ones are shared out. No more workers than blocks:
        # each one loads the model, which a worker with nothing to do would load for nothing.
        blocks = min(len(pending), max(workers, min(-(-len(pending) // batch_size), 4 * workers)))
        workers = min(workers, blocks)
        dataset = ray.data.from_items(
            [{"path": path, "source": source} for path, source in pending], override_num_blocks=blocks
        )
        results = dataset.map_batches(
            Classifier,
            fn_constructor_kwargs={
                "config": dataclasses.replace(
                    job.config,
                    checkpoint=job.config.checkpoint.resolve(),
                    precision=precision,  # type: ignore[arg-type]  # one of PRECISIONS, resolved
                    runtime=runtime,  # type: ignore[arg-type]  # one of RUNTIMES, resolved
                    threads=job.cpus_per_worker,
                    prepare_workers=job.cpus_per_worker,
                )
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=(1, workers, workers),  # starts with `workers`; may shrink to one as the work runs out
            num_cpus=job.cpus_per_worker,
        )
        # Written by the workers, each through its own copy of the output's filesystem.
        write = results.write_parquet if output_format(output) == "parquet" else results.write_csv
        write(output.path, filesystem=output.filesystem, min_rows_per_file=ROWS_PER_PART_FILE)
    except ScaleError:
        raise
    except Exception as exc:
        # An actor that could not start or died, a task or a write that failed past Ray's retries: one
        # line here, the whole story in the cluster's logs. What was written stays; --resume continues it.
        # A task's error reads as a traceback whose last line is the error itself.
        raise ScaleError(f"the Ray job failed: {failure_reason(exc)[:300]}") from None
    finally:
        if started_here:
            ray.shutdown()
    written, repeated = written_rows(output, classes)
    missing = [path for path, _ in pending if path not in written]
    if missing:  # Ray retries failed tasks; a row still missing means a write was lost
        raise ScaleError(
            f"{len(missing)} files have no row in {job.output}, e.g. {missing[0]}: run again with --resume"
        )
    failed = sum(1 for path, _ in pending if written[path])
    return RayRun(
        classified=len(pending), skipped=len(work) - len(pending), failed=failed, precision=precision, repeated=repeated
    )


def ray_predict_command(job: RayJob) -> int:
    """`fer predict --engine ray`: 0 unless every new file failed; a summary line on stderr."""
    run = run_on_ray(job)
    print(
        f"{run.classified} files classified ({run.failed} with an error), {run.skipped} already in "
        f"{job.output} skipped; precision {run.precision}",
        file=sys.stderr,
    )
    if run.repeated:
        print(
            f"{run.repeated} rows in {job.output} repeat a path (a block Ray retried after its first write landed): "
            "the rows of one path are the same answer, read by path or drop duplicates",
            file=sys.stderr,
        )
    return 1 if run.classified and run.failed == run.classified else 0
