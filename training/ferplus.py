"""FER+ crowd votes (`ferplus.csv` beside the FER2013 folders) and the training targets they give.

The file joins Microsoft's FER+ relabelling (ten annotators per image) to the folder files; its
README (`../shared/datasets/fer2013/README.md`) says how. Columns: split, path, fer_index, then
ten vote counts in `VOTE_COLUMNS` order.

What the votes become, per label mode (`TrainConfig.label_mode`):

- ``original``: the folder's class, one-hot; every image is kept. `--recipe seed` and the
  recipes before FER+ train this way.
- ``majority``: the FER+ majority (`ferplus_majority`), one-hot; images without one are dropped.
- ``votes``: the vote distribution over the seven classes as a soft target (the FER+ paper's
  best mode), after the paper's outlier rule: a class that only one annotator chose gets no
  weight. Votes for contempt, unknown and not-a-face (NF) name no class of ours: they are left
  out of the distribution, and an image whose seven-class votes are not more than half of its
  votes (mostly contempt, unknown or NF) is dropped, as is an image with no row in the file.

- ``agreed``: the vote distribution where the crowd's majority is the folder's class, the
  folder's one-hot everywhere else; every image is kept. The crowd softens the images it reads
  the same way, and never overrules the intended expression (the crowd moves posed sadness and
  fear to neutral: docs/training.md).

`original_weight` mixes the folder's one-hot label into the FER+ target (``votes`` or
``majority``): w·one-hot + (1−w)·FER+. The folder labels were collected by searching for each
emotion's words, so they carry the intended expression that posed photos show; the crowd reads
the 48-px crop itself and leans to neutral. A dropped image keeps its one-hot label when w > 0.

The FER+ majority of an image (`ferplus_majority`, the val "FER+ truth"): the class with the
most votes among all ten columns, counted only when it is one of our seven classes and no other
column has as many votes. Ties, and images whose top column is contempt, unknown or NF, have no
majority and are left out of the FER+ figures (reported as `num_images`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOTE_COLUMNS = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF",
)  # fmt: skip
# FER+ column → the folder's class name (FER+ says happiness, sadness, anger).
CLASS_OF_COLUMN = {
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fear",
    "happiness": "happy",
    "neutral": "neutral",
    "sadness": "sad",
    "surprise": "surprise",
}
LABEL_MODES = ("original", "majority", "votes", "agreed")
VOTES_FILE = "ferplus.csv"
NO_LABEL = -1


@dataclass(frozen=True)
class SplitVotes:
    """One split's votes, aligned to its files: (N, 10) counts in VOTE_COLUMNS order; has_row marks files in the csv."""

    counts: np.ndarray  # (N, 10) int64, zeros where has_row is False
    has_row: np.ndarray  # (N,) bool

    def class_votes(self, classes: tuple[str, ...]) -> np.ndarray:
        """(N, len(classes)) int64: the votes of each of our classes, in `classes` order."""
        column_of_class = {name: VOTE_COLUMNS.index(column) for column, name in CLASS_OF_COLUMN.items()}
        missing = [name for name in classes if name not in column_of_class]
        if missing:
            raise ValueError(f"FER+ votes name no class {missing}: the folder classes must be FER2013's seven")
        return self.counts[:, [column_of_class[name] for name in classes]]


def read_votes(csv_path: Path, split: str, paths: tuple[str, ...]) -> SplitVotes:
    """The votes for `split`'s files (`paths` relative to the split folder, as `training.data.Split` holds them).

    Raises:
        FileNotFoundError: no votes file.
        ValueError: one line: a malformed file, a split it does not know, a file it names that
            the split folder does not hold, or one file named twice.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no FER+ votes file")
    index_of = {path: i for i, path in enumerate(paths)}
    counts = np.zeros((len(paths), len(VOTE_COLUMNS)), dtype=np.int64)
    has_row = np.zeros(len(paths), dtype=bool)
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            _read_rows(csv.DictReader(handle), csv_path, split, index_of, counts, has_row)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: not a readable CSV file ({exc})") from None
    return SplitVotes(counts=counts, has_row=has_row)


def _read_rows(
    reader: csv.DictReader[str],
    csv_path: Path,
    split: str,
    index_of: dict[str, int],
    counts: np.ndarray,
    has_row: np.ndarray,
) -> None:
    """Fill `counts` and `has_row` from the file's rows for `split`, refusing any row that does not fit."""
    expected = ["split", "path", "fer_index", *VOTE_COLUMNS]
    if reader.fieldnames != expected:
        raise ValueError(f"{csv_path}: columns {reader.fieldnames} are not {expected}")
    for line, row in enumerate(reader, start=2):
        if None in row.values() or None in row:
            raise ValueError(f"{csv_path}:{line}: {len(expected)} fields expected")
        if row["split"] not in ("train", "val"):
            raise ValueError(f"{csv_path}:{line}: split {row['split']!r} is neither train nor val")
        if row["split"] != split:
            continue
        prefix = f"{split}/"
        if not row["path"].startswith(prefix):
            raise ValueError(f"{csv_path}:{line}: {row['path']!r} is not under {prefix}")
        index = index_of.get(row["path"][len(prefix) :])
        if index is None:
            raise ValueError(
                f"{csv_path}:{line}: {row['path']} is not in the {split} folder: the votes belong to other data"
            )
        if has_row[index]:
            raise ValueError(f"{csv_path}:{line}: {row['path']} has a second row")
        try:
            votes = [int(row[column]) for column in VOTE_COLUMNS]
        except (TypeError, ValueError):
            raise ValueError(f"{csv_path}:{line}: vote counts must be whole numbers") from None
        if min(votes) < 0:
            raise ValueError(f"{csv_path}:{line}: a negative vote count")
        counts[index] = votes
        has_row[index] = True


def ferplus_majority(votes: SplitVotes, classes: tuple[str, ...]) -> np.ndarray:
    """(N,) int64: each image's FER+ majority class index, or NO_LABEL (tie, not one of ours, no row)."""
    counts = votes.counts
    top = counts.max(axis=1)
    is_unique_top = (counts == top[:, None]).sum(axis=1) == 1
    top_column = counts.argmax(axis=1)
    labels = np.full(len(counts), NO_LABEL, dtype=np.int64)
    for column, name in CLASS_OF_COLUMN.items():
        if name in classes:
            chosen = votes.has_row & is_unique_top & (top > 0) & (top_column == VOTE_COLUMNS.index(column))
            labels[chosen] = classes.index(name)
    return labels


def vote_distribution(votes: SplitVotes, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, C) float32 summing to 1 where usable, usable (N,) bool), by the rule in the module docstring."""
    class_votes = votes.class_votes(classes).astype(np.float64)
    all_votes = votes.counts.sum(axis=1).astype(np.float64)
    kept = np.where(class_votes > 1, class_votes, 0.0)  # one annotator alone is noise (FER+ paper)
    kept_sum = kept.sum(axis=1)
    usable = votes.has_row & (kept_sum > 0) & (class_votes.sum(axis=1) * 2 > all_votes)
    targets = np.divide(kept, kept_sum[:, None], out=np.zeros_like(kept), where=kept_sum[:, None] > 0)
    return targets.astype(np.float32), usable


def training_targets(
    labels: np.ndarray, classes: tuple[str, ...], mode: str, votes: SplitVotes | None, original_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, C) float32, keep (N,) bool) for a training split under label `mode` (module docstring).

    Raises:
        ValueError: an unknown mode, a FER+ mode without votes, or a weight outside [0, 1].
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {', '.join(LABEL_MODES)}, not {mode!r}")
    if not 0.0 <= original_weight <= 1.0:
        raise ValueError(f"original_weight must be within [0, 1], not {original_weight}")
    one_hot = np.eye(len(classes), dtype=np.float32)[labels]
    if mode == "original":
        return one_hot, np.ones(len(labels), dtype=bool)
    if votes is None:
        raise ValueError(f"label mode {mode!r} needs the FER+ votes file ({VOTES_FILE} beside train/ and val/)")
    if mode == "majority":
        majority = ferplus_majority(votes, classes)
        usable = majority != NO_LABEL
        crowd = np.eye(len(classes), dtype=np.float32)[np.where(usable, majority, 0)]
    elif mode == "agreed":
        crowd, usable = vote_distribution(votes, classes)
        usable &= ferplus_majority(votes, classes) == labels
        targets = np.where(usable[:, None], original_weight * one_hot + (1.0 - original_weight) * crowd, one_hot)
        return targets.astype(np.float32), np.ones(len(labels), dtype=bool)
    else:
        crowd, usable = vote_distribution(votes, classes)
    targets = np.where(usable[:, None], original_weight * one_hot + (1.0 - original_weight) * crowd, one_hot)
    keep = usable | (original_weight > 0)
    return targets.astype(np.float32), keep
