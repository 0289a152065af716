"""A teacher's probabilities for the training images, as soft targets (knowledge distillation).

FER2013's folder labels and FER+'s crowd both describe 48-px web crops; neither says what a
posed, turned face in a photo looks like. A model trained on real photos does know, and its
probabilities on FER2013's images carry part of that (Hinton et al. 2015, "Distilling the
knowledge in a neural network"). `--teacher FILE --teacher-weight w` trains on
(1 − w)·the label mode's target + w·the teacher's probabilities.

The file is an `.npz` written by `python -m training.teacher_facex` (or any tool that writes the
same): `paths`, the split-relative paths of the images as `training.data.Split` holds them;
`classes`, the class names in the columns' order; `probabilities`, (N, C) float32 rows summing
to 1; and `split`, the split folder it was computed on. It may also hold turned views: more
training images, each one of the split's faces seen with the head turned (`view_of`, the
source's path; `view_pixels`, (M, H, W) uint8; `view_probabilities`, (M, C)). A teacher that
knows turned faces then says what each turned face shows, where the keystone augmentation alone
keeps the upright face's label. A view trains with its source's label-mode target, mixed with the
teacher's probabilities for the view itself. The file is derived from the dataset: keep it under
`runs/`, never in the repository.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEW_ARRAYS = ("view_of", "view_pixels", "view_probabilities")


@dataclass(frozen=True)
class TeacherViews:
    """Extra training faces: `sources` (M,) indices into the split, `pixels` (M, H, W) uint8, `probabilities` (M, C)."""

    sources: np.ndarray
    pixels: np.ndarray
    probabilities: np.ndarray


def read_teacher(
    path: Path, split: str, paths: tuple[str, ...], classes: tuple[str, ...], face_shape: tuple[int, ...] = (48, 48)
) -> tuple[np.ndarray, TeacherViews | None]:
    """The teacher's probabilities (N, C) float32 for `split`'s images, in `paths` order, and its turned views.

    Views of images that are not in `paths` (dropped by the label mode) are left out.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line: not a teacher file, another split, other classes, rows that are not
            probabilities, or an image of the split that the file does not cover.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher file")
    try:
        # Our own handle, closed whatever np.load makes of the bytes (it leaks its own on a bad zip).
        with path.open("rb") as handle:
            stored = np.load(handle, allow_pickle=False)
            if not isinstance(stored, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            file_split = str(stored["split"])
            file_classes = tuple(str(name) for name in stored["classes"])
            file_paths = [str(name) for name in stored["paths"]]
            probabilities = np.asarray(stored["probabilities"], dtype=np.float32)
            present = [name for name in VIEW_ARRAYS if name in stored.files]
            if present and len(present) != len(VIEW_ARRAYS):
                raise ValueError(f"turned views need all of {', '.join(VIEW_ARRAYS)}")
            view_of = [str(name) for name in stored["view_of"]] if present else []
            view_pixels = np.asarray(stored["view_pixels"], dtype=np.uint8) if present else None
            view_probabilities = np.asarray(stored["view_probabilities"], dtype=np.float32) if present else None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a teacher file (split, classes, paths, probabilities): {exc}") from None
    if file_split != split:
        raise ValueError(f"{path}: the teacher's probabilities are for split {file_split!r}, not {split!r}")
    if file_classes != classes:
        raise ValueError(f"{path}: the teacher's classes {file_classes} are not the data's {classes}")
    if probabilities.shape != (len(file_paths), len(classes)):
        raise ValueError(f"{path}: probabilities of shape {probabilities.shape} for {len(file_paths)} images")
    if not _are_probabilities(probabilities):
        raise ValueError(f"{path}: the teacher's rows are not probabilities (non-negative, summing to 1)")
    row_of = {name: i for i, name in enumerate(file_paths)}
    missing = [name for name in paths if name not in row_of]
    if missing:
        raise ValueError(f"{path}: no teacher row for {len(missing)} of the split's images, {missing[0]} first")
    taught = probabilities[[row_of[name] for name in paths]]
    if view_pixels is None or view_probabilities is None:
        return taught, None
    if view_probabilities.shape != (len(view_of), len(classes)) or view_pixels.shape[0] != len(view_of):
        raise ValueError(f"{path}: turned views of mismatched lengths or classes")
    if view_pixels.shape[1:] != face_shape:
        raise ValueError(
            f"{path}: turned views of {view_pixels.shape[1:]} pixels, not the training faces' {face_shape}"
        )
    if not _are_probabilities(view_probabilities):
        raise ValueError(f"{path}: the turned views' rows are not probabilities (non-negative, summing to 1)")
    unknown = [name for name in view_of if name not in row_of]
    if unknown:
        raise ValueError(f"{path}: a turned view of {unknown[0]}, which has no teacher row")
    index_of = {name: i for i, name in enumerate(paths)}
    kept = [i for i, name in enumerate(view_of) if name in index_of]
    sources = np.array([index_of[view_of[i]] for i in kept], dtype=np.int64)
    return taught, TeacherViews(sources=sources, pixels=view_pixels[kept], probabilities=view_probabilities[kept])


def _are_probabilities(rows: np.ndarray) -> bool:
    return bool(np.isfinite(rows).all() and (rows >= 0).all() and np.abs(rows.sum(1) - 1).max(initial=0) <= 1e-3)


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not positive, in one line (the CLI checks before labelling for minutes).

    Raises:
        ValueError: a temperature at or below 0.
    """
    if temperature <= 0:
        raise ValueError(f"--temperature must be above 0, not {temperature}")


def check_teacher_weight(weight: float) -> None:
    """Refuse a teacher weight outside [0, 1], in one line (the training CLI checks before reading data).

    Raises:
        ValueError: a weight outside [0, 1].
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--teacher-weight must be within [0, 1], not {weight}")


def calibrated(probabilities: np.ndarray, temperature: float, prior: np.ndarray | None) -> np.ndarray:
    """A teacher's rows softened by `temperature` (p^(1/T), renormalised), then moved to `prior`.

    A teacher trained on other photos reads FER2013's crops with its own class bias (facex puts
    a third of its probability on sad there); multiplying each class by prior / the rows' mean
    and renormalising keeps its reading of each image relative to the others while the mix of
    classes it teaches comes close to `prior`, the folder labels' own (one step, not an exact fit).

    Raises:
        ValueError: a temperature that is not positive.
    """
    check_temperature(temperature)
    rows = np.asarray(probabilities, dtype=np.float64) ** (1.0 / temperature)
    rows /= rows.sum(axis=1, keepdims=True)
    if prior is not None:
        rows *= np.asarray(prior, dtype=np.float64) / rows.mean(axis=0)
        rows /= rows.sum(axis=1, keepdims=True)
    return rows.astype(np.float32)


def with_teacher(targets: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    """(1 − weight)·targets + weight·teacher, row by row.

    Raises:
        ValueError: a weight outside [0, 1].
    """
    check_teacher_weight(weight)
    return ((1.0 - weight) * targets + weight * teacher).astype(np.float32)
