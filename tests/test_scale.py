"""`fer predict --engine ray`: a real local Ray cluster, two workers, against local `fer predict`.

The cluster test runs the command as users do (it starts and stops a local cluster of its own),
then joins one local cluster for a refusal and a resumed run: each cluster start costs seconds of
both cores. Listing, manifests and refusals before any work need no Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli.main import main as fer
from models.checkpoint import CLASSES
from tests.conftest import make_face
from tests.images import encode, face_png, scene_with_face

for extra_module in ("pyarrow", "ray"):
    pytest.importorskip(extra_module, reason="the scale extra is not installed: pip install -e '.[scale]'")

import pyarrow  # noqa: E402  (after the skip: the scale extra brings pyarrow)
import pyarrow.csv  # noqa: E402
import pyarrow.parquet  # noqa: E402
import ray  # noqa: E402

from cli.scale import connect  # noqa: E402
from cli.storage import ScaleError, list_work, read_results  # noqa: E402


def write_images(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"face-{seed:04d}.png"
        path.write_bytes(face_png(seed))
        paths.append(path)
    return paths


def local_rows(inputs: list[Path], out: Path) -> dict[str, dict[str, Any]]:
    assert fer(["predict", *map(str, inputs), "--precision", "fp32", "--format", "jsonl", "--output", str(out)]) == 0
    return {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}


def results(output: Path) -> dict[str, dict[str, Any]]:
    """The output's rows by path; each path once. CSV reads empty text as "", Parquet keeps None: both None here."""
    rows = read_results(output, CLASSES).to_pylist()
    by_path = {row["path"]: {key: (None if value == "" else value) for key, value in row.items()} for row in rows}
    assert len(by_path) == len(rows), "a file has two rows"
    return by_path


def assert_same_row(row: dict[str, Any], expected: dict[str, Any]) -> None:
    if "error" in expected:
        assert row["error"] == expected["error"] and row["label"] is None
        return
    assert row["error"] is None and row["label"] == expected["label"]
    probabilities = expected["probabilities"]
    assert np.allclose([row[name] for name in CLASSES], [probabilities[name] for name in CLASSES], atol=1e-5)
    face = expected["face"]
    assert row["face"] == (" ".join(map(str, face)) if face else None)


@contextlib.contextmanager
def local_cluster() -> Iterator[None]:
    """A local cluster as the command starts one, kept across several runs (each start costs seconds)."""
    connect(None)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_turn")
@pytest.mark.slow(seconds=20)
def test_ray_answers_as_local_fer_predict_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in, relative paths out, as a user types them
    images = Path("images")
    write_images(images / "crops", range(200))
    photo, _ = scene_with_face(200, 120, 160)
    (images / "photo.jpg").write_bytes(photo)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # A manifest beside the images, its paths as people write them: "./" and a file that is not there.
    (images / "list.csv").write_text("path,note\n./crops/face-0003.png,a\ncrops//face-0004.png,b\n./missing.png,c\n")
    later = write_images(Path("later"), range(200, 230))  # moved in before the resumed run

    output = Path("results.csv")  # CSV: its parts are read back typed, whatever each one holds
    command = ["predict", str(images), str(images / "list.csv"), "--engine", "ray", "--precision", "fp32"]
    command += ["--output", str(output)]
    # No --address: the command starts a local cluster for itself and stops it.
    assert fer([*command, "--workers", "2", "--batch-size", "16"]) == 0
    assert not ray.is_initialized()
    first = results(output)
    local = local_rows([images], tmp_path / "local.jsonl")
    assert len(first) == 202 + 3
    for path, expected in local.items():
        assert_same_row(first[path], expected)
    for listed, file in (("./crops/face-0003.png", "face-0003.png"), ("crops//face-0004.png", "face-0004.png")):
        assert_same_row(first[listed], local[str(images / "crops" / file)])  # the row keeps the manifest's text
    assert "No such file" in first["./missing.png"]["error"]

    # Refused, whole, before any work: an output with results and no --resume.
    assert fer(command) == 2
    assert "already holds results" in capsys.readouterr().err
    for path in later:
        shutil.move(path, images / "crops" / path.name)
    with local_cluster():  # joined, as with --address: the command leaves it running
        too_many = str(int(ray.cluster_resources()["CPU"]) + 1)  # no node can hold such a worker
        capsys.readouterr()
        assert fer([*command, "--resume", "--cpus-per-worker", too_many]) == 2
        assert "no worker could ever start" in capsys.readouterr().err
        assert results(output) == first
        # One worker this time: the answers do not depend on how many there are.
        assert fer([*command, "--workers", "1", "--resume"]) == 0
        assert ray.is_initialized()
        # Parquet, the other format: a folder of parts that pyarrow reads as one table.
        crop = str(images / "crops" / "face-0000.png")
        assert (
            fer(
                ["predict", crop, "--engine", "ray", "--workers", "1", "--precision", "fp32", "--output", "one.parquet"]
            )
            == 0
        )
        (row,) = pyarrow.parquet.read_table("one.parquet").to_pylist()
        assert_same_row(row, local[crop])
    both = results(output)
    assert len(both) == 235  # the first run's rows, untouched, and the 30 new files once each
    assert all(both[path] == row for path, row in first.items())
    moved_in = [images / "crops" / path.name for path in later]  # the first rows were compared above
    for path, expected in local_rows(moved_in, tmp_path / "local-new.jsonl").items():
        assert_same_row(both[path], expected)


def test_a_manifest_lists_paths_relative_to_itself_and_must_have_a_path_column(tmp_path: Path) -> None:
    crops = write_images(tmp_path / "data" / "crops", range(3))
    for suffix in ("csv", "parquet"):
        manifest = tmp_path / "data" / f"manifest.{suffix}"
        table = pyarrow.table({"path": ["crops/face-0000.png", "crops/face-0002.png"], "note": ["a", "b"]})
        if suffix == "csv":
            pyarrow.csv.write_csv(table, manifest)
        else:
            pyarrow.parquet.write_table(table, manifest)
        assert list_work([manifest]) == [
            ("crops/face-0000.png", str(crops[0].resolve())),
            ("crops/face-0002.png", str(crops[2].resolve())),
        ]
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("path\n001\n002\n")  # names, not numbers
    assert [path for path, _ in list_work([numbered])] == ["001", "002"]
    bad = tmp_path / "paths.csv"
    bad.write_text("file\nx.png\n")
    with pytest.raises(ScaleError, match="needs a `path` column"):
        list_work([bad])


def test_refusals_need_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "face.png").write_bytes(encode(make_face(0)))
    base = ["predict", str(tmp_path / "face.png"), "--engine", "ray"]
    refusals = {
        "--output results.parquet": base,
        "name it *.parquet or *.csv": [*base, "--output", str(tmp_path / "results.json")],
        "from --output's name": [*base, "--output", str(tmp_path / "r.csv"), "--format", "csv"],
        "--resume is for --engine ray": ["predict", str(tmp_path / "face.png"), "--resume"],
        "--cpus-per-worker is for --engine ray": ["predict", str(tmp_path / "face.png"), "--cpus-per-worker", "2"],
        "--workers 0: give a whole number": [*base, "--output", str(tmp_path / "r.parquet"), "--workers", "0"],
    }
    (tmp_path / "results.csv").write_text("path\n")  # what local `fer predict --format csv` leaves
    refusals["is a file"] = [*base, "--output", str(tmp_path / "results.csv")]
    refusals["no Ray cluster answers there"] = [
        *base,
        "--output",
        str(tmp_path / "r.parquet"),
        "--address",
        "127.0.0.1:1",
    ]
    (tmp_path / "empty").mkdir()
    refusals["no images in"] = ["predict", str(tmp_path / "empty"), "--engine", "ray", "--output", "x.parquet"]
    for folder in ("a", "b"):  # the same relative path in two manifests, two different files
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "face.png").write_bytes(encode(make_face(1)))
        (tmp_path / folder / "list.csv").write_text("path\nface.png\n")
    lists = [str(tmp_path / folder / "list.csv") for folder in ("a", "b")]
    refusals["names two different files"] = ["predict", *lists, "--engine", "ray", "--output", "x.parquet"]
    other = tmp_path / "other.csv"  # results of a model with other classes, to resume
    other.mkdir()
    (other / "part-0.csv").write_text("path,label,confidence,cat,dog,face,error\nx.png,cat,0.9,0.9,0.1,,\n")
    refusals["the columns of another model's results"] = [*base, "--output", str(other), "--resume"]
    for fragment, argv in refusals.items():
        assert fer(argv) == 2, fragment
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    with monkeypatch.context() as without_ray:
        without_ray.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
        assert fer([*base, "--output", str(tmp_path / "results.parquet")]) == 2
        assert "pip install 'fer-service[scale]'" in capsys.readouterr().err
    assert read_results(tmp_path / "nothing.parquet", CLASSES).num_rows == 0


@pytest.mark.usefixtures("ray_turn")
@pytest.mark.slow(seconds=40)
def test_joining_a_ray_start_head_cluster_with_token_authentication(tmp_path: Path) -> None:
    """`ray start --head` where a token exists turns token authentication on (Ray 2.59+): the command finds the token."""
    import socket

    from tests.server import ROOT, free_port, wait_for

    home, images, port = tmp_path / "home", tmp_path / "images", free_port()
    write_images(images, range(3))
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    # What a user's machine has after any local `ray.init()` (Ray writes ~/.ray/auth_token then).
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    # --block: the head runs as this child and takes its own processes down when stopped; `ray stop`
    # would stop every Ray process of this user, other tests' clusters included.
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
         "--node-ip-address", "127.0.0.1", "--object-store-memory", str(2**28)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def listening() -> bool:
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, "the Ray head listening")
        predict = [sys.executable, "-m", "cli", "predict", str(images), "--engine", "ray", "--address",
                   f"127.0.0.1:{port}", "--precision", "fp32"]  # fmt: skip
        joined = subprocess.run(
            [*predict, "--output", str(tmp_path / "out.csv")], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr
        assert "3 files classified" in joined.stdout + joined.stderr
        refused = subprocess.run(
            [*predict, "--output", str(tmp_path / "refused.csv")], cwd=ROOT, env={**env, "RAY_AUTH_TOKEN": "not-it"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert refused.returncode == 2
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("fer: could not join the Ray cluster") and "$RAY_AUTH_TOKEN is not its own" in last
    finally:
        head.terminate()
        head.wait(120)
        log.close()
    assert "Token authentication is enabled" in (tmp_path / "head.log").read_text()


@dataclass
class TwoNodes:
    """A head and a second node on loopback, one CPU each, as `ray start` makes them."""

    address: str
    worker: subprocess.Popen[bytes]  # the second node's `ray start --block`, leading its own process group

    def power_off_worker(self) -> None:
        """Every process of the second node killed at once (its raylet, its workers): a machine that lost power."""
        os.killpg(self.worker.pid, signal.SIGKILL)


@contextlib.contextmanager
def two_node_cluster(home: Path, log_dir: Path) -> Iterator[TwoNodes]:
    """A head and a second node on loopback, one CPU each, as `ray start` makes them.

    Each node runs as a `ray start --block` child in a session of its own and takes its processes
    down when stopped: `ray stop` would stop every Ray process of this user, other tests' clusters
    included.
    """
    import socket

    from tests.server import free_port, wait_for

    port, ray_cli = free_port(), str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # A small object store: Ray's default reserves 30% of the machine's memory per node.
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(2**28)]
    nodes: list[subprocess.Popen[bytes]] = []

    def start(name: str, arguments: list[str]) -> subprocess.Popen[bytes]:
        with (log_dir / f"{name}.log").open("wb") as log:
            nodes.append(
                subprocess.Popen(
                    [ray_cli, "start", *arguments, *common], env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
        return nodes[-1]

    def listening() -> bool:
        assert nodes[0].poll() is None, (log_dir / "head.log").read_text()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        start("head", ["--head", "--port", str(port), "--include-dashboard=false"])
        wait_for(listening, "the Ray head listening")
        yield TwoNodes(f"127.0.0.1:{port}", start("worker", ["--address", f"127.0.0.1:{port}"]))
    finally:
        for node in reversed(nodes):
            node.terminate()
            node.wait(120)
        for node in nodes:  # anything a stopped node left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)


@pytest.mark.usefixtures("ray_turn")
@pytest.mark.slow(seconds=40)
def test_a_cluster_of_two_nodes_runs_actors_on_both_and_answers_as_local_predict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The public state API (ray.util.state) asks the dashboard, which these nodes do not run; the
    # GCS's own actor table answers without it, dead actors included.
    from ray._private.state import actors as actor_table

    from tests.server import wait_for

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    images = tmp_path / "images"
    write_images(images, range(64))
    output = tmp_path / "out.parquet"
    with two_node_cluster(tmp_path / "home", tmp_path) as cluster:
        address = cluster.address
        connect(address)
        try:
            wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, "both nodes joined")
            command = ["predict", str(images), "--engine", "ray", "--address", address, "--precision", "fp32"]
            assert fer([*command, "--workers", "2", "--batch-size", "8", "--output", str(output)]) == 0
            workers = [actor for actor in actor_table().values() if "MapWorker" in actor["ActorClassName"]]
            nodes_used = {actor["Address"]["NodeID"] for actor in workers}
        finally:
            ray.shutdown()
    assert len(nodes_used) == 2, workers  # one actor on each node: each has the one CPU a worker asks for
    answered, local = results(output), local_rows([images], tmp_path / "local.jsonl")
    assert answered.keys() == local.keys()
    for path, expected in local.items():
        assert_same_row(answered[path], expected)


@pytest.mark.usefixtures("ray_turn")
@pytest.mark.slow(seconds=60)
def test_a_node_lost_mid_run_loses_and_duplicates_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second node powers off while its worker classifies: Ray retries its blocks on the head, every row once."""
    from ray._private.state import actors as actor_table

    from tests.server import ROOT, wait_for

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    images = tmp_path / "images"
    images.mkdir()
    photo, _ = scene_with_face(180, 120, 160)  # photos: seconds of face search for two workers
    for index in range(1500):
        (images / f"photo-{index:04d}.png").write_bytes(photo)
    output = tmp_path / "out.parquet"
    with two_node_cluster(tmp_path / "home", tmp_path) as cluster:
        connect(cluster.address)
        try:
            wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, "both nodes joined")
            head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
            run = subprocess.Popen(
                [sys.executable, "-m", "cli", "predict", str(images), "--engine", "ray", "--address", cluster.address,
                 "--workers", "2", "--batch-size", "8", "--precision", "fp32", "--output", str(output)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip

            def working_on_second_node() -> bool:
                assert run.poll() is None, run.communicate()
                return any(
                    "MapWorker" in actor["ActorClassName"]
                    and actor["State"] == "ALIVE"
                    and actor["Address"]["NodeID"] != head
                    for actor in actor_table().values()
                )

            try:
                wait_for(working_on_second_node, "a worker classifying on the second node", deadline_s=120)
                cluster.power_off_worker()
                still_running = run.poll() is None  # the kill landed mid-run, not after the last row
                _, err = run.communicate(timeout=600)
            finally:
                if run.poll() is None:
                    run.kill()
                    run.communicate()
        finally:
            ray.shutdown()
    assert still_running
    assert run.returncode == 0, err
    assert "1500 files classified (0 with an error)" in err
    rows = read_results(output, CLASSES).to_pylist()
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == 1500  # none lost
    # A block whose write landed before its worker was lost is written again by the retry: the
    # summary counts such rows, and each repeats its path's answer exactly (none repeated in the runs here).
    repeated = len(rows) - len(by_path)
    assert ("repeat a path" in err) == (repeated > 0) and all(row == by_path[row["path"]] for row in rows)
    assert {row["label"] for row in rows} == {rows[0]["label"]} and all(row["error"] is None for row in rows)


def test_rows_that_repeat_a_path_are_counted_not_hidden(tmp_path: Path) -> None:
    """A block retried after its first write landed leaves two part files with the same rows: the count says so."""
    from cli.scale import result_table
    from cli.storage import open_place, written_rows

    output = tmp_path / "out.parquet"
    output.mkdir()
    rows = [{"path": "a.png", "error": "unreadable"}, {"path": "b.png", "error": "unreadable"}]
    for part in ("0.parquet", "1.parquet"):
        pyarrow.parquet.write_table(result_table(rows[: 1 if part == "0.parquet" else 2], CLASSES), output / part)
    written, repeated = written_rows(open_place(output), CLASSES)
    assert written == {"a.png": "unreadable", "b.png": "unreadable"} and repeated == 1
