"""Distillation targets: the teacher file's reader and its refusals, and a tiny run that learns from a teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CLASSES
from training import train
from training.data import list_split
from training.teacher import read_teacher, with_teacher

TINY_FLAGS = ["--batch-size", "16", "--threads", "2", "--log-level", "WARNING", "--epochs", "1"]


def split_paths(root: Path, split: str = "train") -> tuple[str, ...]:
    """The split's image paths as training.data.Split holds them."""
    return tuple(str(path.relative_to(root / split)) for path, _ in list_split(root / split)[1])


def write_teacher(path: Path, paths: tuple[str, ...], probabilities: np.ndarray, **overrides: object) -> Path:
    """A teacher file for `paths`; `overrides` replace any of its four arrays."""
    arrays: dict[str, object] = {
        "split": np.array("train"),
        "classes": np.array(CLASSES),
        "paths": np.array(paths),
        "probabilities": probabilities.astype(np.float32),
    }
    arrays.update(overrides)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def says_happy(count: int) -> np.ndarray:
    """A teacher that answers 'happy' with 0.9 for every image."""
    rows = np.full((count, len(CLASSES)), 0.1 / (len(CLASSES) - 1), np.float32)
    rows[:, CLASSES.index("happy")] = 0.9
    return rows


def test_the_reader_puts_rows_in_the_split_order_whatever_the_files_order(tiny_dataset: Path, tmp_path: Path) -> None:
    paths = split_paths(tiny_dataset)
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.ones(len(CLASSES)), size=len(paths)).astype(np.float32)
    order = rng.permutation(len(paths))
    file = write_teacher(tmp_path / "t.npz", tuple(paths[i] for i in order), rows[order])
    assert np.array_equal(read_teacher(file, "train", paths, CLASSES), rows)
    mixed = with_teacher(np.eye(len(CLASSES), dtype=np.float32)[np.zeros(len(paths), int)], rows, 0.25)
    assert np.allclose(mixed[:, 0], 0.75 + 0.25 * rows[:, 0]) and np.allclose(mixed.sum(1), 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split": np.array("val")}, "are for split 'val', not 'train'"),
        ({"classes": np.array(CLASSES[::-1])}, "are not the data's"),
        ({"paths": None}, "no teacher row for 1 of the split's images"),
        ({"probabilities": None}, "are not probabilities"),
        ({"garbage": None}, "not a teacher file"),
    ],
)
def test_the_reader_refuses_a_file_that_does_not_fit_in_one_line(
    tiny_dataset: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    paths = split_paths(tiny_dataset)
    rows = says_happy(len(paths))
    file = tmp_path / "t.npz"
    if "paths" in change:
        write_teacher(file, paths[1:], rows[1:])
    elif "probabilities" in change:
        write_teacher(file, paths, rows * 2)
    elif "garbage" in change:
        file.write_bytes(b"not an npz file")
    else:
        write_teacher(file, paths, rows, **change)
    with pytest.raises(ValueError, match=message) as raised:
        read_teacher(file, "train", paths, CLASSES)
    assert "\n" not in str(raised.value)


def test_a_run_with_a_missing_or_half_given_teacher_stops_in_one_line(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS]
    assert train.main([*argv, "--teacher", str(tmp_path / "absent.npz"), "--teacher-weight", "0.5"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent.npz'}: no teacher file\n"
    assert train.main([*argv, "--teacher", str(tmp_path / "absent.npz")]) == 2
    assert capsys.readouterr().err.startswith("error: --teacher FILE and --teacher-weight w")


@pytest.mark.slow
def test_a_tiny_run_trains_on_the_teachers_probabilities(tiny_dataset: Path, tmp_path: Path) -> None:
    paths = split_paths(tiny_dataset)
    file = write_teacher(tmp_path / "happy.npz", paths, says_happy(len(paths)))
    output = tmp_path / "model.pth"
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", str(tmp_path / "run"), "--output", str(output)]
    argv += ["--teacher", str(file), "--teacher-weight", "0.6", "--cache-dir", str(tmp_path / "cache")]
    assert train.main([*argv, *TINY_FLAGS]) == 0
    raw = torch.load(output, map_location="cpu", weights_only=True)
    assert raw["training"]["config"]["teacher"] == str(file)
    assert raw["training"]["config"]["teacher_weight"] == 0.6
    # The targets trained on: 0.4 of the folder labels (20 images a class) + 0.6 of the teacher.
    happy = CLASSES.index("happy")
    expected = [0.4 / len(CLASSES) + 0.6 * (0.9 if i == happy else 0.1 / 6) for i in range(len(CLASSES))]
    assert list(raw["training"]["target_prior"].values()) == pytest.approx(expected, abs=1e-4)
