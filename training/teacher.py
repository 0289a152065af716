"""A teacher's probabilities for the training images, as soft targets (knowledge distillation).

FER2013's folder labels and FER+'s crowd both describe 48-px web crops; neither says what a
posed, turned face in a photo looks like. A model trained on real photos does know, and its
probabilities on FER2013's images carry part of that (Hinton et al. 2015, "Distilling the
knowledge in a neural network"). `--teacher FILE --teacher-weight w` trains on
(1 − w)·the label mode's target + w·the teacher's probabilities.

The file is an `.npz` written by `python -m training.teacher_facex` (or any tool that writes the
same): `paths`, the split-relative paths of the images as `training.data.Split` holds them;
`classes`, the class names in the columns' order; `probabilities`, (N, C) float32 rows summing
to 1; and `split`, the split folder it was computed on. It is derived from the dataset: keep it
under `runs/`, never in the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_teacher(path: Path, split: str, paths: tuple[str, ...], classes: tuple[str, ...]) -> np.ndarray:
    """The teacher's probabilities (N, C) float32 for `split`'s images, in `paths` order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line: not a teacher file, another split, other classes, rows that are not
            probabilities, or an image of the split that the file does not cover.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher file")
    try:
        with np.load(path, allow_pickle=False) as stored:
            file_split = str(stored["split"])
            file_classes = tuple(str(name) for name in stored["classes"])
            file_paths = [str(name) for name in stored["paths"]]
            probabilities = np.asarray(stored["probabilities"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a teacher file (split, classes, paths, probabilities): {exc}") from None
    if file_split != split:
        raise ValueError(f"{path}: the teacher's probabilities are for split {file_split!r}, not {split!r}")
    if file_classes != classes:
        raise ValueError(f"{path}: the teacher's classes {file_classes} are not the data's {classes}")
    if probabilities.shape != (len(file_paths), len(classes)):
        raise ValueError(f"{path}: probabilities of shape {probabilities.shape} for {len(file_paths)} images")
    if (
        not np.isfinite(probabilities).all()
        or (probabilities < 0).any()
        or np.abs(probabilities.sum(1) - 1).max() > 1e-3
    ):
        raise ValueError(f"{path}: the teacher's rows are not probabilities (non-negative, summing to 1)")
    row_of = {name: i for i, name in enumerate(file_paths)}
    missing = [name for name in paths if name not in row_of]
    if missing:
        raise ValueError(f"{path}: no teacher row for {len(missing)} of the split's images, {missing[0]} first")
    return probabilities[[row_of[name] for name in paths]]


def with_teacher(targets: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    """(1 − weight)·targets + weight·teacher, row by row.

    Raises:
        ValueError: a weight outside [0, 1].
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--teacher-weight must be within [0, 1], not {weight}")
    return ((1.0 - weight) * targets + weight * teacher).astype(np.float32)
