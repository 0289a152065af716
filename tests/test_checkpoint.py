from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    CLASSES,
    drop_figures,
    load_checkpoint,
    read_checkpoint_dict,
    save_checkpoint,
    store_metrics,
    write_checkpoint_dict,
)
from models.errors import CheckpointError
from models.network import EmotionRecognitionModelPyTorch
from models.predictor import Predictor
from models.preprocessing import PreprocessingSpec


@pytest.fixture()
def checkpoint_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.pth"
    save_checkpoint(path, EmotionRecognitionModelPyTorch(), metrics={"accuracy": 0.5}, training={"recipe": "test"})
    return path


def test_checkpoint_round_trips_through_weights_only_load(checkpoint_path: Path) -> None:
    raw = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert raw["architecture"] == "EmotionRecognitionModelPyTorch"
    assert raw["classes"] == list(CLASSES)
    assert raw["preprocessing"] == {
        "size": 48, "grayscale": True, "mean": 0.5, "std": 0.5, "interpolation": "bilinear", "tencrop_resize": 52,
    }  # fmt: skip
    loaded = load_checkpoint(checkpoint_path)
    assert loaded.classes == CLASSES
    assert loaded.preprocessing == PreprocessingSpec()
    assert loaded.metrics == {"accuracy": 0.5}
    assert not loaded.network.training
    assert len(loaded.sha256) == 64


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothere\.pth: no such file"):
        load_checkpoint(tmp_path / "nothere.pth")


def test_truncated_checkpoint_is_refused(checkpoint_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: not a readable weights-only torch file"):
        load_checkpoint(truncated)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable"):
        load_checkpoint(path)


def test_plain_tensor_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"tensor\.pth: holds a tensor, not a checkpoint dict"):
        load_checkpoint(path)


def test_bare_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save(EmotionRecognitionModelPyTorch().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"state\.pth: not a fer-service checkpoint \(missing keys"):
        load_checkpoint(path)


def test_unknown_architecture_is_refused(checkpoint_path: Path) -> None:
    raw = read_checkpoint_dict(checkpoint_path)
    raw["architecture"] = "ResNet9000"
    write_checkpoint_dict(raw, checkpoint_path)
    with pytest.raises(CheckpointError, match=r"unknown architecture 'ResNet9000'"):
        Predictor(load_checkpoint(checkpoint_path), precision="fp32", runtime="torch")  # the network is built here


def test_weights_of_the_wrong_shape_are_refused(checkpoint_path: Path) -> None:
    raw = read_checkpoint_dict(checkpoint_path)
    raw["state_dict"]["features.0.0.weight"] = torch.zeros(32, 1, 3, 3)
    write_checkpoint_dict(raw, checkpoint_path)
    with pytest.raises(CheckpointError, match=r"weights do not fit EmotionRecognitionModelPyTorch"):
        Predictor(load_checkpoint(checkpoint_path), precision="fp32", runtime="torch")  # the network is built here


def test_class_list_that_does_not_fit_the_head_is_refused(checkpoint_path: Path) -> None:
    raw = read_checkpoint_dict(checkpoint_path)
    raw["classes"] = ["happy", "sad"]
    write_checkpoint_dict(raw, checkpoint_path)
    with pytest.raises(CheckpointError, match=r"weights do not fit .* with 2 classes"):
        Predictor(load_checkpoint(checkpoint_path), precision="fp32", runtime="torch")  # the network is built here


def test_wrong_format_version_is_refused(checkpoint_path: Path) -> None:
    raw = read_checkpoint_dict(checkpoint_path)
    raw["format_version"] = 99
    write_checkpoint_dict(raw, checkpoint_path)
    with pytest.raises(CheckpointError, match=r"format_version 99"):
        load_checkpoint(checkpoint_path)


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_pickle_that_carries_code_is_refused_and_inert(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"format_version": 1, "payload": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match=r"evil\.pth: not a readable weights-only torch file"):
        load_checkpoint(path)
    assert not marker.exists()


def test_saved_checkpoint_is_readable_by_other_users(checkpoint_path: Path) -> None:
    assert checkpoint_path.stat().st_mode & 0o044 == 0o044  # group and others may read (umask 022)


def test_a_checkpoint_written_before_the_ten_crop_geometry_was_stored_gets_the_default(checkpoint_path: Path) -> None:
    payload = read_checkpoint_dict(checkpoint_path)
    del payload["preprocessing"]["tencrop_resize"]
    write_checkpoint_dict(payload, checkpoint_path)
    assert load_checkpoint(checkpoint_path).preprocessing.tencrop_resize == 52


def test_stored_metrics_say_which_tta_modes_were_measured_and_give_each_its_figures(checkpoint_path: Path) -> None:
    assert load_checkpoint(checkpoint_path).figures.measured_tta_modes() == ("none",)  # "tta" absent: measured without
    main = {"accuracy": 0.6, "macro_f1": 0.5, "tta": "flip", "num_images": 10}
    store_metrics(checkpoint_path, main, {"tencrop": {"accuracy": 0.7, "tta": "tencrop"}, "flip": {"accuracy": 0.1}})
    loaded = load_checkpoint(checkpoint_path)
    assert loaded.figures.measured_tta == "flip"
    # The main mode is never an alternative; "none", stored before (same weights), stays.
    assert loaded.figures.measured_tta_modes() == ("flip", "none", "tencrop")
    labelled = {**main, "precision": "fp32"}  # figures stored without a precision were measured in fp32
    assert loaded.figures.metrics_for("flip") == labelled
    assert loaded.figures.metrics_for("tencrop") == {**labelled, "accuracy": 0.7, "tta": "tencrop"}
    assert loaded.figures.metrics_for("none") == {**labelled, "accuracy": 0.5, "tta": "none"}
    assert loaded.figures.metrics_for("none", "bf16") is None
    # Figures measured another way (another split) replace what was stored instead of sitting beside it.
    store_metrics(checkpoint_path, {**main, "split": "test", "num_images": 20})
    assert load_checkpoint(checkpoint_path).figures.measured_tta_modes() == ("flip",)
    assert loaded.training == {"recipe": "test"}  # everything else is left as it was


def test_dropping_a_precisions_figures_keeps_the_others(checkpoint_path: Path) -> None:
    fp32 = {"accuracy": 0.6, "precision": "fp32", "tta": "none"}
    store_metrics(checkpoint_path, fp32, precisions={"int8": ({**fp32, "precision": "int8", "accuracy": 0.61}, {})})
    assert load_checkpoint(checkpoint_path).figures.measured_precisions() == ("fp32", "int8")
    assert drop_figures(checkpoint_path, "int8") and not drop_figures(checkpoint_path, "int8")
    assert load_checkpoint(checkpoint_path).figures.measured_precisions() == ("fp32",)
    store_metrics(checkpoint_path, {**fp32, "precision": "int8"}, precisions={"fp32": (fp32, {})})
    assert drop_figures(checkpoint_path, "int8")  # the main one: fp32's become the main figures
    assert load_checkpoint(checkpoint_path).figures.measured_precisions() == ("fp32",)
    assert load_checkpoint(checkpoint_path).training == {"recipe": "test"}  # everything else is left as it was


def test_metrics_of_an_unknown_tta_mode_are_refused(checkpoint_path: Path) -> None:
    with pytest.raises(ValueError, match="tta must be one of"):
        store_metrics(checkpoint_path, {"accuracy": 0.5, "tta": "twentycrop"})
    payload = read_checkpoint_dict(checkpoint_path)
    payload["metrics"] = {"accuracy": 0.5, "tta": "twentycrop"}
    write_checkpoint_dict(payload, checkpoint_path)
    with pytest.raises(CheckpointError, match="unknown TTA mode"):
        load_checkpoint(checkpoint_path)
