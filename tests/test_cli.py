from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from models.checkpoint import CLASSES, load_checkpoint
from models.preprocessing import preprocess_bytes
from tests.conftest import SHIPPED_CHECKPOINT
from tests.images import face_png, scene_with_face


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
            network(preprocess_bytes(face_png(1), load_checkpoint(SHIPPED_CHECKPOINT).preprocessing)[None]), 1
        )[0]
    assert [float(rows[0][c]) for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-4)


def test_predict_with_ten_crop_matches_the_ten_crop_predictor(
    image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.predictor import Predictor
    from tests.conftest import make_face

    assert main(["predict", str(image_dir / "a.png"), "--tta", "tencrop", "--precision", "fp32"]) == 0
    row = json.loads(capsys.readouterr().out)
    expected = Predictor.from_checkpoint(SHIPPED_CHECKPOINT, precision="fp32", tta="tencrop").predict([make_face(1)])
    plain = Predictor.from_checkpoint(SHIPPED_CHECKPOINT, precision="fp32", tta="none").predict([make_face(1)])
    assert row["probabilities"] == pytest.approx(expected[0].probabilities, abs=1e-5)
    assert row["probabilities"] != pytest.approx(plain[0].probabilities, abs=1e-4)


def test_fer_console_script_has_help_for_every_command() -> None:
    fer = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parent.parent / ".venv")) / "bin" / "fer"
    if not fer.exists():
        pytest.skip(f"{fer} is not installed: run make install")
    for command in ([], ["predict"], ["export"], ["serve"], ["train"], ["evaluate"], ["plots"]):
        result = subprocess.run([str(fer), *command, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
        # flags that fall back to a computed value say so in their help; "(default: None)" would contradict it
        assert "(default: None)" not in result.stdout, command


def sample_faces(fer2013_dir: Path | None) -> torch.Tensor:
    spec = load_checkpoint(SHIPPED_CHECKPOINT).preprocessing
    if fer2013_dir is not None:
        files = sorted((fer2013_dir / "val").glob("*/*.jpg"))[::56][:64]
        return torch.stack([preprocess_bytes(path.read_bytes(), spec) for path in files])
    return torch.stack([preprocess_bytes(face_png(seed), spec) for seed in range(16)])


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


def test_onnx_export_matches_pytorch(tmp_path: Path, faces: torch.Tensor) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    out = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", "--output", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    exported = session.run(["logits"], {"faces": faces.numpy()})[0]
    assert exported.shape == (len(faces), 7)
    assert np.abs(exported - reference_logits(faces)).max() < 1e-4
