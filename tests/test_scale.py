"""`fer predict --engine ray`: a real local Ray cluster, two workers, against local `fer predict`.

The cluster test starts one local cluster the way the command does and runs the command twice on
it (a run, then a resumed run): each start costs seconds of both cores. `benchmarks/scale.py`
runs the command as users do, starting and stopping its own. Listing and manifests need no Ray.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

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

from cli.scale import ScaleError, connect, list_work, written_rows  # noqa: E402


def write_images(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"face-{seed:04d}.png"
        path.write_bytes(face_png(seed))
        paths.append(path)
    return paths


def local_rows(inputs: list[Path], out: Path) -> dict[str, dict[str, object]]:
    assert fer(["predict", *map(str, inputs), "--precision", "fp32", "--format", "jsonl", "--output", str(out)]) == 0
    return {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}


def assert_same_rows(ray_rows: list[dict[str, object]], local: dict[str, dict[str, object]]) -> None:
    assert sorted(str(row["path"]) for row in ray_rows) == sorted(local)  # each file once, none lost
    for row in ray_rows:
        expected = local[str(row["path"])]
        if "error" in expected:
            assert row["error"] == expected["error"] and row["label"] is None
            continue
        assert row["error"] is None and row["label"] == expected["label"]
        probabilities = expected["probabilities"]
        assert isinstance(probabilities, dict)
        assert np.allclose([row[name] for name in CLASSES], [probabilities[name] for name in CLASSES], atol=1e-5)
        face = expected["face"]
        assert row["face"] == (" ".join(map(str, face)) if isinstance(face, list) else None)


@pytest.fixture()
def local_cluster() -> Iterator[None]:
    """A local cluster as the command starts one, kept across the test's runs (each start costs seconds)."""
    connect(None)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_answers_as_local_fer_predict_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_cluster: None
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in, relative paths out, as a user types them
    images = Path("images")
    write_images(images / "crops", range(200))
    photo, _ = scene_with_face(200, 120, 160)
    (images / "photo.jpg").write_bytes(photo)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    later = write_images(Path("later"), range(200, 230))  # moved in before the resumed run

    output = Path("results.parquet")
    command = ["predict", str(images), "--engine", "ray", "--precision", "fp32", "--output", str(output)]
    assert fer([*command, "--workers", "2", "--batch-size", "16"]) == 0
    assert ray.is_initialized()  # the command leaves a cluster it joined, and stops only one it started
    first = pyarrow.parquet.read_table(output).to_pylist()
    local = local_rows([images], tmp_path / "local.jsonl")
    assert len(first) == 202 and sum(row["error"] is not None for row in first) == 1
    assert_same_rows(first, local)

    # Without --resume an output that holds results is refused, whole, before any work.
    assert fer(command) == 2
    for path in later:
        shutil.move(path, images / "crops" / path.name)
    # One worker this time: the answers do not depend on how many there are.
    assert fer([*command, "--workers", "1", "--resume"]) == 0
    both = pyarrow.parquet.read_table(output).to_pylist()
    assert len(both) == 232  # the 202 rows of the first run, untouched, and the 30 new files once each
    by_path = {row["path"]: row for row in both}
    assert all(by_path[row["path"]] == row for row in first)
    assert_same_rows(both, local_rows([images], tmp_path / "local-all.jsonl"))


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
    bad = tmp_path / "paths.csv"
    bad.write_text("file\nx.png\n")
    with pytest.raises(ScaleError, match="needs a `path` column"):
        list_work([bad])


def test_refusals_need_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "face.png").write_bytes(encode(make_face(0)))
    base = ["predict", str(tmp_path / "face.png"), "--engine", "ray"]
    with monkeypatch.context() as without_ray:
        without_ray.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
        assert fer([*base, "--output", str(tmp_path / "results.parquet")]) == 2
        assert "pip install 'fer-service[scale]'" in capsys.readouterr().err
    assert fer(base) == 2
    assert "--output results.parquet" in capsys.readouterr().err
    assert fer([*base, "--output", str(tmp_path / "results.json")]) == 2
    assert "name it *.parquet or *.csv" in capsys.readouterr().err
    assert fer(["predict", str(tmp_path / "face.png"), "--resume"]) == 2
    assert "--resume is for --engine ray" in capsys.readouterr().err
    assert written_rows(tmp_path / "nothing.parquet") == {}
