"""Where `fer predict --engine ray` finds its images and keeps its results: local paths or object storage.

A place is a local path or a URI: `s3://bucket/prefix`, `gs://…`, `hdfs://…`, `file:///…`, or
any protocol fsspec knows where fsspec is installed (`pyarrow.fs.FileSystem.from_uri` first, fsspec
after). Both are opened through pyarrow's filesystems, so listing a prefix, reading a manifest,
checking and reading back the output and writing its part files are one code path for a folder and
a bucket. Credentials and endpoints come from the usual environment, read by pyarrow's S3 client
as by the AWS tools: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_PROFILE`, `AWS_REGION`, and `AWS_ENDPOINT_URL` for an S3-compatible store (MinIO, Ceph,
R2). Images are read by the workers, each from its own connection; the driver only lists.

pyarrow comes with the `scale` extra; it is imported when a place is first opened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from cli.results import MAX_FILE_BYTES, csv_columns, iter_images, too_large
from models.decoding import IMAGE_SUFFIXES
from models.errors import FerError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
LARGE_OBJECT_BYTES = 8 * 2**20  # above a phone photo's size: read one at a time
_LARGE_READS = threading.BoundedSemaphore(1)
MANIFEST_SUFFIXES = (".csv", ".parquet")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STORAGE_ADVICE = "check the bucket or path and the AWS_* settings (AWS_ENDPOINT_URL for an S3-compatible store)"


class ScaleError(FerError):
    """A Ray run that cannot start or finish: Ray missing, a bad output, a manifest without paths."""


def is_uri(text: str) -> bool:
    """Whether `text` names a place by URI (`scheme://…`) rather than a local path."""
    return _URI.match(text) is not None


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, or its type's name: what a one-line refusal quotes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@dataclass(frozen=True)
class Place:
    """A file or folder: its name as the user wrote it (what results keep), its filesystem, its path there."""

    text: str
    filesystem: pyarrow.fs.FileSystem
    path: str
    # A remote place's scheme://netloc and that root's path in the filesystem: a listed path is
    # named again as root_uri + what follows root_path (the host of hdfs://nn:8020 included).
    root_uri: str | None = None
    root_path: str = ""

    @property
    def is_local(self) -> bool:
        return self.root_uri is None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1].lower()

    def file_type(self) -> str:
        """ "file", "directory" or "missing"; a store that cannot be reached or refuses is one ScaleError."""
        import pyarrow.fs

        try:
            kind = self.filesystem.get_file_info(self.path).type
        except OSError as exc:
            raise ScaleError(f"{self.text}: cannot be read ({first_line(exc)}); {STORAGE_ADVICE}") from None
        return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "directory"}.get(kind, "missing")

    def children(self) -> list[str]:
        """The path in the filesystem of every file under this folder or prefix, recursively, sorted."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, recursive=True, allow_not_found=True)
        try:
            found = self.filesystem.get_file_info(selector)
        except OSError as exc:  # a missing bucket, a refused listing, an endpoint that does not answer
            raise ScaleError(f"{self.text}: cannot list it ({first_line(exc)}); {STORAGE_ADVICE}") from None
        return sorted(info.path for info in found if info.type == pyarrow.fs.FileType.File)

    def check_bucket(self) -> None:
        """Refuse, in one line, a URI whose bucket (its scheme://netloc) is not there to write under."""
        if self.root_uri is None:
            return
        if self.root_path.strip("/") and open_place(self.root_uri).file_type() != "directory":
            raise ScaleError(
                f"{self.text}: {self.root_uri} does not exist or cannot be seen with these credentials; "
                f"{STORAGE_ADVICE}"
            )

    def uri_of(self, path: str) -> str:
        """The text that names `path` of this place's filesystem: a URI for a remote place, else the path."""
        if self.root_uri is None:
            return path
        root = self.root_path.rstrip("/")
        if root and not (path == root or path.startswith(root + "/")):
            raise ScaleError(f"{path}: not under {self.root_uri}")
        return self.root_uri + "/" + path[len(root) :].lstrip("/")


def open_place(text: str | Path) -> Place:
    """The place `text` names; a URI whose filesystem cannot be opened is one ScaleError.

    `file://` URIs are local paths (percent-decoded): read and listed as the folders they are.
    """
    import pyarrow.fs

    text = str(text)
    if text.startswith("file://"):
        return Place(text, pyarrow.fs.LocalFileSystem(), str(Path(unquote(urlsplit(text).path)).resolve()))
    if not is_uri(text):
        return Place(text, pyarrow.fs.LocalFileSystem(), str(Path(text).resolve()))
    scheme, rest = text.split("://", 1)
    netloc, _, key = rest.partition("/")
    root_uri = f"{scheme}://{netloc}"
    # One filesystem (an S3 client, its region resolved once) serves every key of a bucket; the
    # environment is part of the key, since it holds the credentials and the endpoint.
    settings = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_")))
    filesystem, root = _shared_filesystem(root_uri, settings)
    path = f"{root.rstrip('/')}/{key}".rstrip("/") if key else root
    return Place(text, filesystem, path, root_uri, root)


@functools.lru_cache(maxsize=64)
def _shared_filesystem(root: str, settings: tuple[tuple[str, str], ...]) -> tuple[pyarrow.fs.FileSystem, str]:
    return _open_filesystem(root)


def _open_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's filesystem for `uri` and the path in it; fsspec's for the protocols pyarrow lacks."""
    import pyarrow as pa
    import pyarrow.fs

    try:
        opened: tuple[pyarrow.fs.FileSystem, str] = pyarrow.fs.FileSystem.from_uri(uri)
        return opened
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # a scheme pyarrow has no filesystem for
        reason = first_line(exc)
    except OSError as exc:  # pyarrow's own store, unreachable or refusing (a region lookup, credentials)
        raise ScaleError(f"{uri}: cannot be opened ({first_line(exc)}); {STORAGE_ADVICE}") from None
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ScaleError(f"{uri}: pyarrow cannot open it ({reason}), and fsspec is not installed") from None
    try:
        filesystem, path = url_to_fs(uri)
    except (ImportError, ValueError, OSError) as exc:
        raise ScaleError(f"{uri}: neither pyarrow ({reason}) nor fsspec ({first_line(exc)}) can open it") from None
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem)), path


def read_object(uri: str) -> bytes | OSError:
    """The bytes of the object `uri` names, or the error that stands in its row (missing, refused, too large).

    The size is asked first, so an object larger than any image the engine accepts costs nothing,
    and the read is bounded even if the object grows meanwhile.
    """
    try:
        place = open_place(uri)
        info = place.filesystem.get_file_info(place.path)
        if info.size is None:
            return OSError(f"{uri}: not found")
        if info.size > MAX_FILE_BYTES:
            return too_large(uri)
        # Reads run ahead of the engine on a few threads (cli/scale.py): past LARGE_OBJECT_BYTES
        # they take turns, so a worker holds at most that many small objects and one large one.
        turn = _LARGE_READS if info.size > LARGE_OBJECT_BYTES else contextlib.nullcontext()
        with turn, place.filesystem.open_input_stream(place.path) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, ScaleError) as exc:
        return OSError(f"{uri}: {first_line(exc)}")
    if len(data) > MAX_FILE_BYTES:
        return too_large(uri)
    return bytes(data)


def output_format(output: Place) -> str:
    """ "parquet" or "csv", from the output's name."""
    try:
        return OUTPUT_FORMATS[output.suffix]
    except KeyError:
        raise ScaleError(
            f"--output {output.text}: name it *.parquet or *.csv (a folder of part files in that format)"
        ) from None


def list_work(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(path as written in the results, path or URI to read) for every image the inputs name.

    Local folders and image files are listed as `fer predict` lists them; a URI prefix is listed
    like a folder (its images, recursively, sorted). A manifest's paths are read relative to the
    manifest's own folder or prefix, so a manifest travels with its images; an entry that is a URI
    stays one. The results keep each path as the manifest writes it.
    """
    work: list[tuple[str, str]] = []
    for item in map(str, inputs):
        place = open_place(item)
        kind = place.file_type()
        if kind == "file" and place.suffix in MANIFEST_SUFFIXES:
            work += [(text, manifest_entry(place, text)) for text in manifest_paths(place)]
        elif place.is_local:
            folder = Path(place.path) if is_uri(item) else Path(item)  # file:// names a local folder
            work += [(str(path), str(path.resolve())) for path in iter_images([folder])]
        elif kind == "file":
            work.append((item, item))
        elif kind == "missing":
            place.check_bucket()
            raise ScaleError(f"{item}: no such object or prefix; {STORAGE_ADVICE}")
        else:
            work += [
                (uri, uri)
                for uri in map(place.uri_of, place.children())
                if posixpath.splitext(uri)[1].lower() in IMAGE_SUFFIXES
            ]
    return work


def manifest_entry(manifest: Place, entry: str) -> str:
    """What a manifest's entry names: a URI as it is, else a path relative to the manifest's folder or prefix.

    In a bucket, an entry is a key below the manifest's prefix: one that is absolute or climbs
    out of the bucket (`..`) is refused in one line, since a worker would read it from its own
    disk or from nowhere.
    """
    if is_uri(entry):
        return entry
    folder = posixpath.dirname(manifest.path)
    if manifest.is_local:
        return posixpath.join(folder, entry)
    joined = posixpath.normpath(posixpath.join(folder, entry))
    if posixpath.isabs(entry) or not (joined + "/").startswith(manifest.root_path.rstrip("/") + "/"):
        raise ScaleError(
            f"manifest {manifest.text}: {entry} is not a key below the manifest's bucket; list keys relative "
            "to the manifest, or URIs"
        )
    return manifest.uri_of(joined)


def manifest_paths(manifest: Place) -> list[str]:
    """The `path` column of a CSV or Parquet manifest, as text."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if manifest.suffix == ".csv":
            # Typed as text: a column of names like 001, 002 would otherwise become the integers 1, 2.
            options = pyarrow.csv.ConvertOptions(include_columns=["path"], column_types={"path": pa.string()})
            with manifest.filesystem.open_input_stream(manifest.path) as stream:
                table = pyarrow.csv.read_csv(stream, convert_options=options)
        else:
            table = pyarrow.parquet.read_table(manifest.path, columns=["path"], filesystem=manifest.filesystem)
    except OSError as exc:  # unreadable, refused (pyarrow's ArrowInvalid is not an OSError)
        raise ScaleError(f"manifest {manifest.text}: cannot be read ({first_line(exc)})") from None
    except (KeyError, pa.ArrowException) as exc:  # a missing column is a KeyError or ArrowInvalid
        raise ScaleError(
            f"manifest {manifest.text}: needs a `path` column of image paths ({first_line(exc)})"
        ) from None
    column = table.column("path")
    if pa.types.is_dictionary(column.type):  # pandas' categoricals
        column = column.cast(column.type.value_type)
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if not any(is_text(column.type) for is_text in text):
        raise ScaleError(f"manifest {manifest.text}: its `path` column holds {column.type}, not text")
    return [str(value) for value in column.to_pylist() if value]


def result_schema(classes: Sequence[str]) -> pa.Schema:
    """`fer predict --format csv`'s columns, typed: one float64 per class, nulls where a file failed."""
    import pyarrow as pa

    types = {"path": pa.string(), "label": pa.string(), "face": pa.string(), "error": pa.string()}
    return pa.schema([(name, types.get(name, pa.float64())) for name in csv_columns(classes)])


def part_files(output: Place) -> list[str]:
    """The output's part files (paths in its filesystem), sorted; none when the output does not exist yet."""
    return [path for path in output.children() if posixpath.splitext(path)[1].lower() == output.suffix]


def read_results(output: Place | str | Path, classes: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Every row the runs so far wrote under `output` (an empty table when there are none), typed as written.

    Refuses, in one line, a part whose columns are not these classes' (another model's run) or that
    cannot be read (cut short by an interrupted run), naming it.
    """
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.dataset
    import pyarrow.parquet

    output = output if isinstance(output, Place) else open_place(output)
    schema = result_schema(classes)
    wanted = list(columns or schema.names)
    csv_parsing = pyarrow.csv.ParseOptions(newlines_in_values=True)  # a path may hold a newline
    parts = part_files(output) if output.file_type() == "directory" else []
    if not parts:
        return schema.empty_table().select(wanted)
    file_format: Any = "parquet"
    if output_format(output) == "csv":
        # Typed from the result schema, not guessed per file: a part whose error column (or, with
        # only errors, whose class columns) is all empty would be read as nulls of no type.
        file_format = pyarrow.dataset.CsvFileFormat(
            convert_options=pyarrow.csv.ConvertOptions(column_types=dict(zip(schema.names, schema.types, strict=True))),
            parse_options=csv_parsing,
        )
    filesystem = output.filesystem
    for part in parts:
        try:
            if file_format == "parquet":
                names = pyarrow.parquet.read_schema(part, filesystem=filesystem).names
            else:
                with filesystem.open_input_stream(part) as stream:
                    names = pyarrow.csv.open_csv(stream, parse_options=csv_parsing).schema.names
        except (pa.ArrowException, OSError) as exc:
            raise cut_short(output, part, exc) from None
        if names != schema.names:
            raise ScaleError(
                f"--output {output.text}: {posixpath.basename(part)} has the columns of another model's results "
                f"({', '.join(names[:10])}): name another output for this checkpoint"
            )
    try:
        dataset = pyarrow.dataset.dataset(parts, schema=schema, format=file_format, filesystem=filesystem)
        return dataset.to_table(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        for part in parts:  # name the part that fails
            try:
                pyarrow.dataset.dataset(part, schema=schema, format=file_format, filesystem=filesystem).to_table(
                    columns=["path"]
                )
            except (pa.ArrowException, OSError) as part_exc:
                raise cut_short(output, part, part_exc) from None
        raise cut_short(output, None, exc) from None


def cut_short(output: Place, part: str | None, exc: BaseException) -> ScaleError:
    """The refusal for a part file that cannot be read."""
    which = f"{posixpath.basename(part)} cannot be read" if part else "a part file cannot be read"
    return ScaleError(
        f"--output {output.text}: {which}, likely cut short by an interrupted run; delete it and run again with "
        f"--resume ({first_line(exc)})"
    )


def written_rows(output: Place, classes: Sequence[str]) -> tuple[dict[str, str], int]:
    """Path → error ("" for a result) of every row the runs so far wrote under `output`, and how many rows repeat a path.

    A repeat means a part file was written twice: a block whose task Ray retried after its first
    write had landed (a worker lost between writing and reporting).
    """
    table = read_results(output, classes, ["path", "error"])
    rows = {
        str(path): str(error or "")
        for path, error in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True)
    }
    return rows, table.num_rows - len(rows)
