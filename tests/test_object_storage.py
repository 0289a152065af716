"""`fer predict --engine ray` in and out of object storage: a real S3 API on loopback (moto's server).

The server is moto's standalone one, started by the test as a child process: every request goes
over HTTP to a real S3 API, through pyarrow's S3 client as with AWS, MinIO or R2, configured from
the usual environment (AWS_ENDPOINT_URL and the credentials). Nothing is patched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main as fer

for extra_module in ("pyarrow", "ray", "moto.server", "boto3"):
    pytest.importorskip(
        extra_module, reason="the scale and dev extras are not installed: pip install -e '.[scale,dev]'"
    )

import boto3  # noqa: E402

from tests.server import free_port, wait_for  # noqa: E402
from tests.test_scale import assert_same_row, local_rows, results, write_images  # noqa: E402

BUCKET = "photos"


def s3_server(log: Path, environment: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free loopback port; returns it and its endpoint URL."""
    import socket

    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **environment},
        )  # fmt: skip

    def listening() -> bool:
        assert server.poll() is None, log.read_text()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, "moto's S3 server listening")
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 API on loopback with one bucket, and the environment that points AWS clients at it; yields its endpoint."""
    server, endpoint = s3_server(tmp_path / "moto.log", {})
    # What a user sets for any S3-compatible store; the local Ray cluster's workers inherit it.
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(30)


def upload(folder: Path, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")


@pytest.mark.usefixtures("ray_turn")
@pytest.mark.slow(seconds=40)
def test_s3_in_and_out_answers_as_local_predict_and_resumes_there(
    s3: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    write_images(images, range(40))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    upload(images, "in")
    output = f"s3://{BUCKET}/runs/results.parquet"
    command = ["predict", f"s3://{BUCKET}/in", "--engine", "ray", "--precision", "fp32", "--batch-size", "8"]

    assert fer([*command, "--workers", "2", "--output", output]) == 0
    assert "41 files classified (1 with an error), 0 already" in capsys.readouterr().err
    local = local_rows([images], tmp_path / "local.jsonl")
    answered = results(output)
    assert answered.keys() == {f"s3://{BUCKET}/in/{Path(path).name}" for path in local}
    for path, expected in local.items():
        row = answered[f"s3://{BUCKET}/in/{Path(path).name}"]
        if "error" in expected:  # the same decoder's refusal, naming nothing local
            assert row["label"] is None and row["error"] == expected["error"]
        else:
            assert_same_row(row, expected)
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="runs/results.parquet/")["Contents"]
    parts = [entry["Key"] for entry in listed if not entry["Key"].endswith("/")]  # "/": the folder's marker
    assert parts and all(key.endswith(".parquet") for key in parts)

    # More objects arrive, and a manifest names two of them by relative key and one that is not there.
    more = tmp_path / "more"
    write_images(more, range(40, 45))
    upload(more, "in")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\nin/face-0040.png\nin/face-0041.png\nin/gone.png\n")
    boto3.client("s3").upload_file(str(manifest), BUCKET, "manifest.csv")
    assert fer([*command, "--workers", "1", "--output", output, "--resume"]) == 0
    assert "5 files classified (0 with an error), 41 already" in capsys.readouterr().err
    assert fer([*command[:1], f"s3://{BUCKET}/manifest.csv", *command[2:], "--output", output, "--resume"]) == 0
    assert "3 files classified (1 with an error)" in capsys.readouterr().err
    answered_after = results(output)
    for path, row in answered.items():
        assert answered_after[path] == row  # the first run's rows are untouched
    assert answered_after["in/face-0040.png"]["label"] == answered_after[f"s3://{BUCKET}/in/face-0040.png"]["label"]
    gone = answered_after["in/gone.png"]
    assert gone["label"] is None and gone["error"].startswith(f"s3://{BUCKET}/in/gone.png: ")
    assert len(answered_after) == 41 + 5 + 3


def test_a_missing_bucket_or_a_refused_listing_is_one_line(
    s3: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["predict", "--engine", "ray", "--output", str(tmp_path / "out.parquet")]
    assert fer([*command, "s3://no-such-bucket/in"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "fer: s3://no-such-bucket/in: s3://no-such-bucket does not exist or cannot be seen with these credentials; "
        "check the bucket or path and the AWS_* settings (AWS_ENDPOINT_URL for an S3-compatible store)"
    )
    assert fer([*command, f"s3://{BUCKET}/nothing-here"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"fer: s3://{BUCKET}/nothing-here: no such object or prefix; ")
    assert fer(["predict", "--engine", "ray", f"s3://{BUCKET}", "--output", "s3://no-such-bucket/out.parquet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fer: s3://no-such-bucket/out.parquet: ")

    # A store that checks credentials (moto with its IAM checks on) refuses an unknown key: 403.
    server, endpoint = s3_server(tmp_path / "moto-auth.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # the fixture's monkeypatch restores it
        assert fer([*command, f"s3://{BUCKET}/in"]) == 2
    finally:
        server.terminate()
        server.wait(30)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"fer: s3://{BUCKET}/in: cannot be read (" in err, err
    assert "ACCESS_DENIED" in err


def test_local_predict_refuses_uris_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fer(["predict", "s3://bucket/in"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fer: s3://bucket/in: object storage is read and written by --engine ray (fer-service[scale])"
    )


def test_a_manifest_in_a_bucket_names_keys_below_it_and_nothing_else(s3: str, tmp_path: Path) -> None:
    from cli.storage import ScaleError, list_work

    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="sets/a/list.csv", Body=b"path\n./x.png\n../b/y.png\ns3://elsewhere/z.png\n")
    assert list_work([f"s3://{BUCKET}/sets/a/list.csv"]) == [
        ("./x.png", f"s3://{BUCKET}/sets/a/x.png"),
        ("../b/y.png", f"s3://{BUCKET}/sets/b/y.png"),
        ("s3://elsewhere/z.png", "s3://elsewhere/z.png"),
    ]
    for entry in ("/etc/passwd", "../../../outside.png"):  # a worker's own disk, or above the bucket
        client.put_object(Bucket=BUCKET, Key="sets/a/bad.csv", Body=f"path\n{entry}\n".encode())
        with pytest.raises(ScaleError, match="is not a key below the manifest's bucket") as refused:
            list_work([f"s3://{BUCKET}/sets/a/bad.csv"])
        assert "\n" not in str(refused.value)


def test_file_uris_are_local_folders_and_listed_paths_keep_their_host() -> None:
    import pyarrow.fs

    from cli.storage import Place, list_work

    folder = Path(__file__).parent / "data"
    local = list_work([folder.as_uri()])
    assert [source for _, source in local] == [str((folder / "astronaut.jpg").resolve())]
    # hdfs://namenode:8020/… lists paths without the host: naming them again keeps it.
    place = Place("hdfs://nn:8020/data", pyarrow.fs.LocalFileSystem(), "/data", "hdfs://nn:8020", "")
    assert place.uri_of("/data/a b.png") == "hdfs://nn:8020/data/a b.png"
    bucket = Place("s3://b/in", pyarrow.fs.LocalFileSystem(), "b/in", "s3://b", "b")
    assert bucket.uri_of("b/in/x.png") == "s3://b/in/x.png"
