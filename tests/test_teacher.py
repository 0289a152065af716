"""Distillation targets: the teacher file's reader and its refusals, and a tiny run that learns from a teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import CLASSES
from training import teacher_facex, train
from training.augment import turned_faces
from training.data import list_split
from training.teacher import calibrated, read_teacher, with_teacher

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
    assert np.array_equal(read_teacher(file, "train", paths, CLASSES)[0], rows)
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


@pytest.mark.slow
def test_a_resume_on_a_rewritten_teacher_file_is_refused(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = split_paths(tiny_dataset)
    file = write_teacher(tmp_path / "teacher.npz", paths, says_happy(len(paths)))
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    argv += ["--teacher", str(file), "--teacher-weight", "0.5", *TINY_FLAGS]
    assert train.main(argv) == 0
    says_sad = np.roll(says_happy(len(paths)), 2, axis=1)  # the same flags, another teacher's rows
    write_teacher(file, paths, says_sad)
    assert train.main([*argv, "--epochs", "2", "--resume"]) == 2
    assert "started on other training images or targets" in capsys.readouterr().err
    write_teacher(file, paths, says_happy(len(paths)))  # the file it started with: the run goes on
    assert train.main([*argv, "--epochs", "2", "--resume"]) == 0
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["epoch"] == 2


def test_turned_faces_keep_an_upright_face_and_squeeze_the_far_side() -> None:
    face = torch.full((1, 48, 48), 200, dtype=torch.uint8)
    assert torch.equal(turned_faces(face, torch.zeros(1)), face)
    turned = turned_faces(face.expand(2, 48, 48), torch.tensor([0.4, -0.4]))
    # turned right, the right edge's rows sample beyond the face at top and bottom: black corners there
    assert turned[0, 0, -1] < 100 < turned[0, 0, 0] and turned[0, 24, 24] == 200
    assert torch.equal(turned[1], turned[0].flip(-1))


def test_turned_views_join_the_training_images_with_their_sources_labels(tiny_dataset: Path, tmp_path: Path) -> None:
    paths = split_paths(tiny_dataset)
    views = {"view_of": np.array(paths[:3]), "view_pixels": np.zeros((3, 48, 48), np.uint8)}
    file = write_teacher(tmp_path / "t.npz", paths, says_happy(len(paths)), **views, view_probabilities=says_happy(3))
    probabilities, taught_views = read_teacher(file, "train", paths, CLASSES)
    assert taught_views is not None and taught_views.sources.tolist() == [0, 1, 2]
    # a label mode that dropped the first image drops its view too
    assert read_teacher(file, "train", paths[1:], CLASSES)[1].sources.tolist() == [0, 1]  # type: ignore[union-attr]
    half = write_teacher(tmp_path / "half.npz", paths, says_happy(len(paths)), view_of=np.array(paths[:3]))
    with pytest.raises(ValueError, match="turned views need all of view_of, view_pixels, view_probabilities"):
        read_teacher(half, "train", paths, CLASSES)
    stray = {**views, "view_of": np.array(["angry/absent.png", *paths[1:3]])}
    file = write_teacher(
        tmp_path / "stray.npz", paths, says_happy(len(paths)), **stray, view_probabilities=says_happy(3)
    )
    with pytest.raises(ValueError, match="a turned view of angry/absent.png, which has no teacher row"):
        read_teacher(file, "train", paths, CLASSES)


@pytest.mark.slow
def test_a_tiny_run_trains_on_the_turned_views_too(tiny_dataset: Path, tmp_path: Path) -> None:
    paths = split_paths(tiny_dataset)
    views = {"view_of": np.array(paths[:10]), "view_pixels": np.zeros((10, 48, 48), np.uint8)}
    neutral = np.full((10, len(CLASSES)), 0.0, np.float32)
    neutral[:, CLASSES.index("neutral")] = 1.0
    file = write_teacher(tmp_path / "t.npz", paths, says_happy(len(paths)), **views, view_probabilities=neutral)
    output = tmp_path / "model.pth"
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", str(tmp_path / "run"), "--output", str(output)]
    argv += ["--teacher", str(file), "--teacher-weight", "1", "--cache-dir", str(tmp_path / "cache")]
    assert train.main([*argv, *TINY_FLAGS]) == 0
    raw = torch.load(output, map_location="cpu", weights_only=True)
    assert raw["training"]["images"] == len(paths) + 10
    prior = raw["training"]["target_prior"]
    assert prior["neutral"] == pytest.approx((len(paths) * 0.1 / 6 + 10) / (len(paths) + 10), abs=1e-4)


def test_facex_labels_a_split_and_its_turned_views(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed (make install puts it in)")
    try:
        teacher_facex.facex_model_file()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "facex.npz"
    argv = ["--data-dir", str(tiny_dataset), "--out", str(out), "--turned-views", "--cache-dir", str(tmp_path / "c")]
    assert teacher_facex.main([*argv, "--threads", "1", "--log-level", "WARNING"]) == 0
    paths = split_paths(tiny_dataset)
    probabilities, views = read_teacher(out, "train", paths, CLASSES)
    assert probabilities.shape == (len(paths), len(CLASSES)) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert views is not None and views.sources.tolist() == list(range(len(paths)))
    assert views.pixels.shape == (len(paths), 48, 48) and views.probabilities.shape == probabilities.shape
    # each view is its source seen turned: the same face, with its far side squeezed into black corners
    pixels = np.stack([np.asarray(Image.open(tiny_dataset / "train" / p).convert("L")) for p in paths])
    changed = (views.pixels.astype(int) - pixels).__abs__() > 8
    assert (changed.mean(axis=(1, 2)) > 0.05).all()
    corners = np.minimum(views.pixels[:, 0, [0, -1]], views.pixels[:, -1, [0, -1]]).min(axis=1)
    assert (corners < 40).all()


def test_calibration_softens_and_moves_the_class_mix_towards_the_folders() -> None:
    rng = np.random.default_rng(1)
    rows = rng.dirichlet(np.full(len(CLASSES), 0.3), size=500)
    rows[:, CLASSES.index("sad")] += 1.0  # a teacher that leans to sad
    rows /= rows.sum(1, keepdims=True)
    assert np.allclose(calibrated(rows, 1.0, None), rows, atol=1e-6)
    softened = calibrated(rows, 2.0, None)
    assert softened.max(1).mean() < rows.max(1).mean() and np.allclose(softened.sum(1), 1.0, atol=1e-5)
    assert (softened.argmax(1) == rows.argmax(1)).all()  # softening never changes the teacher's answer
    prior = np.full(len(CLASSES), 1 / len(CLASSES))
    moved = calibrated(rows, 2.0, prior)
    sad = CLASSES.index("sad")
    assert (
        rows.mean(0)[sad] > 0.5 and abs(moved.mean(0)[sad] - prior[sad]) < abs(softened.mean(0)[sad] - prior[sad]) / 2
    )
    with pytest.raises(ValueError, match="--temperature must be above 0, not 0"):
        calibrated(rows, 0.0, None)


def test_views_follow_their_sources_when_the_label_mode_drops_images(tmp_path: Path) -> None:
    from training.config import TrainConfig
    from training.data import Split

    paths = ("angry/a.png", "happy/b.png", "sad/c.png")  # the label mode dropped "fear/x.png"
    labels = np.array([0, 3, 5])
    split = Split(pixels=np.zeros((3, 48, 48), np.uint8), labels=labels, classes=CLASSES, paths=paths)
    targets = np.eye(len(CLASSES), dtype=np.float32)[labels]
    teacher_rows = np.full((4, len(CLASSES)), 1 / len(CLASSES), np.float32)
    view_rows = np.eye(len(CLASSES), dtype=np.float32)[[4, 6, 2]]  # each view its own answer
    file = write_teacher(
        tmp_path / "t.npz",
        ("fear/x.png", *paths),
        teacher_rows,
        view_of=np.array(["sad/c.png", "fear/x.png", "angry/a.png"]),
        view_pixels=np.stack([np.full((48, 48), value, np.uint8) for value in (10, 20, 30)]),
        view_probabilities=view_rows,
    )
    config = TrainConfig(teacher=str(file), teacher_weight=0.5)
    grown, grown_targets = train.taught(config, split, targets)
    # the view of the dropped image is gone; the others keep their own pixels, answers and sources
    assert grown.paths[3:] == ("sad/c.png#turned", "angry/a.png#turned")
    assert grown.labels.tolist() == [0, 3, 5, 5, 0]
    assert [int(face[0, 0]) for face in grown.pixels[3:]] == [10, 30]
    assert np.allclose(grown_targets[3], 0.5 * targets[2] + 0.5 * view_rows[0])
    assert np.allclose(grown_targets[4], 0.5 * targets[0] + 0.5 * view_rows[2])
    assert np.allclose(grown_targets[1], 0.5 * targets[1] + 0.5 / len(CLASSES))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 truncated", "not a teacher file"),
        (None, "turned views of (24, 24) pixels, not the training faces' (48, 48)"),
    ],
)
def test_a_broken_teacher_file_stops_the_run_in_one_line(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    paths = split_paths(tiny_dataset)
    file = tmp_path / "t.npz"
    if content is None:
        small = {"view_of": np.array(paths[:1]), "view_pixels": np.zeros((1, 24, 24), np.uint8)}
        write_teacher(file, paths, says_happy(len(paths)), **small, view_probabilities=says_happy(1))
    else:
        file.write_bytes(content)
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS]
    assert train.main([*argv, "--teacher", str(file), "--teacher-weight", "0.5", "--cache-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("error: ") and error.count("\n") == 1


def test_the_distil_recipe_without_its_teacher_file_says_how_to_write_it(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.checkpoint import SHIPPED_CHECKPOINT
    from training.config import TEACHER_COMMAND, TEACHER_FILE

    start = SHIPPED_CHECKPOINT.resolve()
    monkeypatch.chdir(tmp_path)  # no runs/ here
    argv = ["--data-dir", str(tiny_dataset), "--run-dir", "run", "--recipe", "distil", "--init-from", str(start)]
    assert train.main([*argv, *TINY_FLAGS]) == 2
    assert capsys.readouterr().err == f"error: {TEACHER_FILE}: no teacher file ({TEACHER_COMMAND} writes it)\n"
