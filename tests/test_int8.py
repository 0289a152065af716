"""The int8 forward path: agreement with fp32 on real faces, its tie to the weights, and auto's fallbacks."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.__main__ import main as serve_main
from models.checkpoint import load_checkpoint, read_checkpoint_dict, store_metrics
from models.errors import CheckpointError
from models.int8 import int8_model_path, weights_sha256
from models.predictor import Predictor
from models.preprocessing import preprocess_bytes, to_model_input
from tests.conftest import SHIPPED_CHECKPOINT
from tests.images import face_png
from tests.server import app_serving, get, post
from training import quantize
from training.data import load_split

SHIPPED_INT8 = int8_model_path(SHIPPED_CHECKPOINT)


def copy_with_int8(folder: Path, *, perturb: bool = False) -> Path:
    """The shipped checkpoint and its int8 file copied into `folder`; `perturb` changes one weight."""
    checkpoint = folder / "model.pth"
    payload = read_checkpoint_dict(SHIPPED_CHECKPOINT)
    if perturb:
        name = next(key for key in payload["state_dict"] if key.endswith("weight"))
        payload["state_dict"][name] = payload["state_dict"][name] + 1e-3
    torch.save(payload, checkpoint)
    shutil.copyfile(SHIPPED_INT8, int8_model_path(checkpoint))
    return checkpoint


def test_the_shipped_int8_file_belongs_to_the_shipped_weights() -> None:
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    assert Predictor(checkpoint, precision="int8").precision == "int8"
    # Its figures were measured and are within auto's tolerance of fp32's.
    int8, fp32 = checkpoint.figures.metrics_for("none", "int8"), checkpoint.figures.metrics_for("none", "fp32")
    assert int8 is not None and fp32 is not None
    assert int8["accuracy"] >= fp32["accuracy"] - 0.003


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_real_faces(fer2013_dir: Path) -> None:
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    split = load_split(fer2013_dir / "val", checkpoint.preprocessing)
    faces = to_model_input(torch.from_numpy(split.pixels[::6]), checkpoint.preprocessing)  # 599 real faces
    fp32 = Predictor(checkpoint, precision="fp32", tta="none").predict_tensors(faces)
    int8 = Predictor(checkpoint, precision="int8", tta="none").predict_tensors(faces)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.99
    drift = np.abs(fp32 - int8).max(axis=1)
    assert np.quantile(drift, 0.99) <= 0.05  # all of val: 0.025 at the 99th percentile, 0.074 at worst
    assert drift.max() <= 0.1


def test_storing_figures_keeps_the_int8_file_valid(tmp_path: Path) -> None:
    checkpoint = copy_with_int8(tmp_path)
    before = load_checkpoint(checkpoint)
    store_metrics(checkpoint, {**before.metrics, "accuracy": 0.5})
    after = load_checkpoint(checkpoint)
    assert after.sha256 != before.sha256 and weights_sha256(after.network) == weights_sha256(before.network)
    assert Predictor(after, precision="int8").precision == "int8"


def test_int8_from_other_weights_is_refused_and_auto_serves_torch(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(copy_with_int8(tmp_path, perturb=True))
    with pytest.raises(CheckpointError, match="quantised from other weights") as refused:
        Predictor(checkpoint, precision="int8")
    assert "\n" not in str(refused.value) and "training.quantize" in str(refused.value)
    auto = Predictor(checkpoint, precision="auto")
    assert auto.precision in ("fp32", "bf16") and "int8" not in auto.speeds


def test_an_unreadable_or_missing_int8_file_is_refused(tmp_path: Path) -> None:
    checkpoint = copy_with_int8(tmp_path)
    int8_model_path(checkpoint).write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load it"):
        Predictor(load_checkpoint(checkpoint), precision="int8")
    int8_model_path(checkpoint).unlink()
    with pytest.raises(
        CheckpointError, match=r"no such file \(python -m training.quantize --checkpoint .*model\.pth makes it"
    ):
        Predictor(load_checkpoint(checkpoint), precision="int8")
    auto = Predictor(load_checkpoint(checkpoint), precision="auto")
    assert auto.precision in ("fp32", "bf16") and "int8" not in auto.speeds


def test_auto_serves_torch_when_onnx_runtime_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` meets when it is not installed
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    auto = Predictor(checkpoint, precision="auto")
    assert auto.precision in ("fp32", "bf16") and "int8" not in auto.speeds
    with pytest.raises(CheckpointError, match="ONNX Runtime is not installed"):
        Predictor(checkpoint, precision="int8")


def test_auto_never_serves_int8_without_figures_that_put_it_near_fp32(tmp_path: Path) -> None:
    checkpoint = copy_with_int8(tmp_path)
    loaded = load_checkpoint(checkpoint)
    fp32, bf16 = loaded.figures.metrics_for("none", "fp32"), loaded.figures.metrics_for("none", "bf16")
    assert fp32 is not None and bf16 is not None
    # int8 measured 0.4 points below fp32: more than auto's 0.3.
    lower = {**fp32, "precision": "int8", "accuracy": fp32["accuracy"] - 0.004}
    store_metrics(checkpoint, fp32, precisions={"int8": (lower, {})})
    auto = Predictor(load_checkpoint(checkpoint), precision="auto")
    assert auto.precision != "int8" and "int8" not in auto.speeds
    # Figures for fp32 and bf16 only: int8 is not a candidate either.
    payload = read_checkpoint_dict(checkpoint)
    payload["metrics"]["precision_alternatives"] = {"bf16": bf16}
    torch.save(payload, checkpoint)
    auto = Predictor(load_checkpoint(checkpoint), precision="auto")
    assert auto.precision != "int8" and "int8" not in auto.speeds


def test_a_checkpoint_evaluated_in_one_precision_keeps_bf16_and_never_gets_int8(tmp_path: Path) -> None:
    from models.precision import cpu_supports_bf16

    checkpoint = copy_with_int8(tmp_path)
    payload = read_checkpoint_dict(checkpoint)
    payload["metrics"] = load_checkpoint(SHIPPED_CHECKPOINT).figures.metrics_for("none", "fp32")
    torch.save(payload, checkpoint)
    auto = Predictor(load_checkpoint(checkpoint), precision="auto")
    assert "int8" not in auto.speeds and auto.precision != "int8"
    assert ("bf16" in auto.speeds) == cpu_supports_bf16()


def test_start_up_with_a_mismatched_int8_file_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FER_CHECKPOINT", str(copy_with_int8(tmp_path, perturb=True)))
    monkeypatch.setenv("FER_PRECISION", "int8")
    assert serve_main() == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "quantised from other weights" in stderr


def test_an_int8_server_says_so_in_answers_and_metrics() -> None:
    with app_serving(precision="int8") as server:
        answer = post(f"{server.url}/predict", files={"file": ("f.png", face_png(3))}).json()
        metrics = get(f"{server.url}/metrics").json()
    assert answer["model"]["precision"] == metrics["served_precision"] == metrics["precision"] == "int8"
    stored = load_checkpoint(SHIPPED_CHECKPOINT).figures.metrics_for("none", "int8")
    assert stored is not None and metrics["accuracy"] == stored["accuracy"]


def test_quantise_cli_calibrates_on_train_and_refuses_val(tiny_dataset: Path, tmp_path: Path) -> None:
    checkpoint = copy_with_int8(tmp_path)
    int8_model_path(checkpoint).unlink()
    argv = ["--checkpoint", str(checkpoint), "--data-dir", str(tiny_dataset), "--images", "64", "--log-level", "ERROR"]
    assert quantize.main([*argv, "--split", "val"]) == 2
    assert quantize.main(argv) == 0
    loaded = load_checkpoint(checkpoint)
    faces = torch.stack([preprocess_bytes(face_png(seed), loaded.preprocessing) for seed in range(4)])
    made = Predictor(loaded, precision="int8", tta="none")
    assert made.precision == "int8" and "on 64 train faces" in made.int8_recipe
    probabilities = made.predict_tensors(faces)
    assert probabilities.shape == (4, 7) and np.allclose(probabilities.sum(axis=1), 1.0)
