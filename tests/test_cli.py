"""`fer`: predict, export and every command's help, in process; one run of the real console script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from cli.main import main
from models.checkpoint import CLASSES, load_checkpoint
from models.preprocessing import preprocess_bytes
from tests.conftest import ROOT, SHIPPED_CHECKPOINT, make_face, reference_probabilities
from tests.images import ASTRONAUT, face_png, scene_with_face


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.png").write_bytes(face_png(1))
    (folder / "nested" / "b.png").write_bytes(face_png(2))
    (folder / "nested" / "scene.jpg").write_bytes(scene_with_face(300, 150, 100)[0])
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_predict_writes_json_lines_for_a_folder(image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(image_dir), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "broken.jpg", "b.png", "scene.jpg"]
    assert "not a recognisable image" in rows[1]["error"]
    assert rows[3]["face"] is not None
    for row in (rows[0], rows[2], rows[3]):
        assert list(row["probabilities"]) == list(CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)


def test_predict_reads_the_services_engine_settings_and_its_flags_win(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = str(image_dir / "nested" / "scene.jpg")
    assert main(["predict", scene]) == 0
    found = json.loads(capsys.readouterr().out)["face"]
    assert found is not None
    # FER_MIN_FACE_PX as the service reads it: the face is now too small to classify.
    monkeypatch.setenv("FER_MIN_FACE_PX", "5000")
    assert main(["predict", scene]) == 0
    assert json.loads(capsys.readouterr().out)["face"] is None
    monkeypatch.delenv("FER_MIN_FACE_PX")
    # FER_PRECISION: int8 for a checkpoint without its int8 file stops with the service's one line;
    # --precision on the command line wins over the variable.
    bare = tmp_path / "bare.pth"
    bare.write_bytes(SHIPPED_CHECKPOINT.read_bytes())
    monkeypatch.setenv("FER_PRECISION", "int8")
    assert main(["predict", scene, "--checkpoint", str(bare)]) == 2
    assert "int8 model" in capsys.readouterr().err
    assert main(["predict", scene, "--checkpoint", str(bare), "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["face"] == found
    monkeypatch.delenv("FER_PRECISION")
    # FER_DETECTOR: Haar searches instead of YuNet (or, on an OpenCV without Haar, says so).
    monkeypatch.setenv("FER_DETECTOR", "haar")
    status = main(["predict", scene])
    out, err = capsys.readouterr()
    if status == 0:
        assert json.loads(out)["face"] != found, "the same box as YuNet's: the detector setting was ignored"
    else:
        assert status == 2 and "Haar detector" in err
    # A bad value is refused in one line naming the variable.
    monkeypatch.setenv("FER_MAX_FACES", "0")
    assert main(["predict", scene]) == 2
    assert "FER_MAX_FACES='0'" in capsys.readouterr().err


def test_predict_table_names_missing_and_oversized_files_and_answers_the_rest(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.results import MAX_FILE_BYTES

    huge = tmp_path / "huge.png"
    with huge.open("wb") as sparse:  # no disk used: the size alone refuses it, nothing is read
        sparse.truncate(MAX_FILE_BYTES + 1)
    files = [image_dir / "a.png", tmp_path / "gone.png", huge]
    assert main(["predict", *map(str, files), "--format", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", "conf", "path"] and len(lines) == 4
    assert lines[1].split()[0] in CLASSES and lines[1].endswith("a.png")
    assert lines[2].startswith("error") and "No such file" in lines[2]
    assert lines[3].startswith("error") and "more than any image of at most 40,000,000 pixels needs" in lines[3]


def test_predict_csv_matches_the_predictor(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert (
        main(["predict", str(image_dir / "a.png"), "--format", "csv", "--output", str(out), "--precision", "fp32"]) == 0
    )
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    network = load_checkpoint(SHIPPED_CHECKPOINT).network
    with torch.inference_mode():
        expected = torch.softmax(
            network(
                torch.from_numpy(preprocess_bytes(face_png(1), load_checkpoint(SHIPPED_CHECKPOINT).preprocessing)[None])
            ),
            1,
        )[0]
    assert [float(rows[0][c]) for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-4)


def test_predict_with_ten_crop_matches_the_ten_crop_predictor(
    image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(image_dir / "a.png"), "--tta", "tencrop", "--precision", "fp32"]) == 0
    row = json.loads(capsys.readouterr().out)
    expected = reference_probabilities(make_face(1), precision="fp32", tta="tencrop")
    plain = reference_probabilities(make_face(1), precision="fp32", tta="none")
    assert row["probabilities"] == pytest.approx(expected, abs=1e-5)
    assert row["probabilities"] != pytest.approx(plain, abs=1e-4)


@pytest.mark.parametrize("command", ["", "predict", "export", "serve", "train", "evaluate", "plots"])
def test_fer_has_help_for_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*filter(None, [command]), "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    # flags that fall back to a computed value say so in their help; "(default: None)" would contradict it
    assert "(default: None)" not in out


# What each extra brings that the base install does not; the test below checks that `fer predict`
# needs none of it. At least these must be among them, or the computation below has gone wrong.
KNOWN_EXTRAS_ONLY = {
    *("tqdm", "matplotlib"),  # train
    *("onnx", "onnxscript"),  # export
    *("ray", "pyarrow"),  # scale
    *("pytest", "hypothesis", "schemathesis", "playwright"),  # dev
}


def installed_closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements pull in, transitively (extras of dependencies included)."""
    found: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            needs = requires(requirement.name) or []
        except PackageNotFoundError:
            continue  # not installed here (another platform's dependency)
        found.add(key[0])
        for text in needs:
            need = Requirement(text)
            wanted = need.marker is None or any(
                need.marker.evaluate({**default_environment(), "extra": extra}) for extra in ("", *key[1])
            )
            if wanted:
                todo.append(need)
    return found


def extras_only_modules() -> set[str]:
    """Top-level modules whose every distribution comes only with the extras (train, export, dev)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = installed_closure(project["dependencies"])
    extras = installed_closure([text for texts in project["optional-dependencies"].values() for text in texts])
    only_extras = extras - base
    return {
        module
        for module, distributions in packages_distributions().items()
        if {canonicalize_name(name) for name in distributions} <= only_extras
    }


@pytest.mark.slow
def test_fer_predict_works_from_an_install_without_the_extras(tmp_path: Path) -> None:
    blocked = extras_only_modules()
    assert blocked >= KNOWN_EXTRAS_ONLY, KNOWN_EXTRAS_ONLY - blocked
    # Imported at start-up by the child: None in sys.modules is what `import` meets for a module that is not
    # installed (ModuleNotFoundError), and importlib.util.find_spec then answers None, as without the package.
    (tmp_path / "sitecustomize.py").write_text(
        f"import sys\n\nsys.modules.update(dict.fromkeys({sorted(blocked)!r}))\n"
    )
    (tmp_path / "face.png").write_bytes(face_png(1))
    # The real console script where it is installed (make install), `python -m cli` where it is not.
    fer = Path(sys.executable).parent / "fer"
    command = [str(fer)] if fer.exists() else [sys.executable, "-m", "cli"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [*command, "predict", str(tmp_path / "face.png"), "--format", "jsonl", "--progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["label"] in CLASSES and list(row["probabilities"]) == list(CLASSES)
    assert "1/1" not in result.stderr  # with --progress, tqdm would have drawn its bar: the block held


def sample_faces(fer2013_dir: Path | None) -> torch.Tensor:
    spec = load_checkpoint(SHIPPED_CHECKPOINT).preprocessing
    if fer2013_dir is not None:
        files = sorted((fer2013_dir / "val").glob("*/*.jpg"))[::56][:64]
        return torch.from_numpy(np.stack([preprocess_bytes(path.read_bytes(), spec) for path in files]))
    return torch.from_numpy(np.stack([preprocess_bytes(face_png(seed), spec) for seed in range(16)]))


@pytest.fixture()
def faces() -> torch.Tensor:
    value = os.environ.get("FER2013_DIR")
    path = Path(value) if value and (Path(value) / "val").is_dir() else None
    return sample_faces(path)


def reference_logits(faces: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return load_checkpoint(SHIPPED_CHECKPOINT).network(faces).numpy()


@pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")  # torch 2.14 deprecates TorchScript loading too
def test_torchscript_export_matches_pytorch(tmp_path: Path, faces: torch.Tensor) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", "--format", "torchscript", "--output", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    with torch.inference_mode():
        exported = scripted(faces).numpy()
    assert np.abs(exported - reference_logits(faces)).max() < 1e-4


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path: Path, faces: torch.Tensor) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    out = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", "--output", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    exported = session.run(["logits"], {"faces": faces.numpy()})[0]
    assert exported.shape == (len(faces), 7)
    assert np.abs(exported - reference_logits(faces)).max() < 1e-4


def test_predict_gives_a_fifo_an_error_row_instead_of_waiting_for_a_writer(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert main(["predict", str(image_dir / "a.png"), str(fifo)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["label"] and "not a regular file" in rows[1]["error"]


def test_predict_classifies_a_folder_whose_total_is_over_the_services_batch_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    portrait = Image.open(ASTRONAUT).convert("RGB").resize((1600, 1600))  # 2.56 megapixels each
    for index in range(6):
        portrait.save(folder / f"{index}.jpg", quality=90)
    # The service's per-request budgets, set as low as one photo: fer applies per-image limits only.
    monkeypatch.setenv("FER_MAX_BATCH_PIXELS", "1000000")
    monkeypatch.setenv("FER_MAX_PENDING_PIXELS", "1000000")
    assert main(["predict", str(folder), "--batch-size", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and all("error" not in row and row["face"] for row in rows)


def test_classify_files_holds_a_bounded_number_of_bytes_whatever_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from cli import results
    from models.config import EngineConfig
    from models.engine import Engine

    files = []
    for index in range(12):  # 300 KB files that are not images: each is read, refused and let go
        path = tmp_path / f"{index}.png"
        path.write_bytes(os.urandom(300_000))
        files.append(path)
    monkeypatch.setattr(results, "MAX_BYTES_IN_FLIGHT", 1_000_000)
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1))
    held, most = [0], [0]
    classify_batch = engine.classify_batch

    async def counting(uploads: list[bytes], **kwargs: object) -> object:
        held[0] += sum(map(len, uploads))
        most[0] = max(most[0], held[0])
        try:
            await asyncio.sleep(0)  # let the reader try to take more while this one is held
            return await classify_batch(uploads, **kwargs)  # type: ignore[arg-type]
        finally:
            held[0] -= sum(map(len, uploads))

    monkeypatch.setattr(engine, "classify_batch", counting)

    async def run() -> list[object]:
        return [answer async for _, answer in results.classify_files(engine, files)]

    try:
        answers = asyncio.run(run())
    finally:
        engine.close()
    assert len(answers) == 12 and all("not a recognisable image" in str(answer) for answer in answers)
    assert 0 < most[0] <= 1_000_000
    # An error kept as an answer holds no traceback or chained error: their frames would keep each
    # file's bytes alive until the garbage collector ran (10 files of 300 MB: 3.7 GB before).
    assert all(isinstance(answer, Exception) and answer.__traceback__ is None for answer in answers)
    assert all(isinstance(answer, Exception) and answer.__context__ is None for answer in answers)


def test_a_ray_failure_names_its_cause_not_rays_advice() -> None:
    from cli.scale import failure_reason

    class TaskError(Exception):  # how Ray wraps a task's error: the original as `cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__(
                f"Traceback (most recent call last):\n  File x\n{cause!r}\nTo change retry attempts, set …"
            )
            self.cause = cause

    wrapped = RuntimeError("To change retry attempts, set DataContext.actor_task_retry_on_errors")
    wrapped.__cause__ = TaskError(MemoryError("the actor ran out of memory decoding /data/x.heic"))
    assert failure_reason(wrapped) == "MemoryError: the actor ran out of memory decoding /data/x.heic"


def test_ctrl_c_stops_predict_in_one_line_with_the_rows_so_far_written(tmp_path: Path) -> None:
    import signal

    folder = tmp_path / "many"
    folder.mkdir()
    faces = [face_png(seed) for seed in range(7)]
    # Seconds of work on any machine, so the interrupt comes long before the end: 1,500 crops were
    # once enough, but served without torch they took under three seconds, which a loaded machine's
    # scheduling of this test could outlast.
    for index in range(6000):
        (folder / f"{index:04d}.png").write_bytes(faces[index % 7])
    # A shell ignores SIGINT in what it starts in the background (`bash .ci/run &`); the child
    # inherits that and Python honours it, as any program should: `fer predict` then ran to the end
    # and exited 0. Ctrl-C at a terminal reaches a program that has not been told to ignore it.
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "predict", str(folder), "--batch-size", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()  # gate on the first row: the run is under way
    assert json.loads(first)["label"] in CLASSES
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert errors.strip().splitlines()[-1] == "fer: interrupted"
    assert len(rest.splitlines()) < 5999  # stopped before the end


def test_a_bad_flag_value_is_named_as_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(ROOT / "tests" / "data" / "astronaut.jpg"), "--batch-size", "5000"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "fer: invalid settings: --batch-size 5000: Input should be less than or equal to 1024"
    )
