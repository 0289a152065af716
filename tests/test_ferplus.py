"""FER+ votes: the label modes, the loader's refusals, training with each mode, and both truths in /metrics."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.server import app_serving, get
from training import evaluate, train
from training.data import list_split
from training.ferplus import (
    CLASS_OF_COLUMN,
    NO_LABEL,
    VOTE_COLUMNS,
    SplitVotes,
    ferplus_majority,
    read_votes,
    training_targets,
    vote_distribution,
)

TINY_FLAGS = ["--batch-size", "16", "--threads", "2", "--log-level", "WARNING", "--epochs", "1"]


def tiny_flags(tmp_path: Path) -> list[str]:
    """The tiny run's flags, with the decode cache in the test's own folder."""
    return [*TINY_FLAGS, "--cache-dir", str(tmp_path / "cache")]


def votes(**counts: int) -> list[int]:
    """Ten vote counts in VOTE_COLUMNS order from column=count keywords."""
    return [counts.get(column, 0) for column in VOTE_COLUMNS]


# Hand-made rows for the first files of train/ (sorted: angry/0.png, angry/1.png, ...), each a rule.
RULES = {
    "angry/0.png": votes(anger=6, neutral=3, sadness=1),  # clear majority; the lone sad vote is noise
    "angry/1.png": votes(anger=4, neutral=4, unknown=2),  # tie: no majority, an even soft target
    "angry/10.png": votes(NF=7, happiness=3),  # mostly not a face: dropped by both FER+ modes
    "angry/11.png": votes(contempt=4, disgust=3, anger=3),  # contempt on top: no majority; votes usable
    # angry/12.png has no row: dropped by both FER+ modes
}


def write_votes(root: Path, rules: dict[str, list[int]], extra_rows: list[list[str]] | None = None) -> Path:
    """ferplus.csv beside root's train/ and val/: `rules` for those train files, a clear vote for every other file."""
    rows = []
    for split in ("train", "val"):
        classes, files = list_split(root / split)
        for path, label in files:
            relative = str(path.relative_to(root / split))
            if split == "train" and relative == "angry/12.png":
                continue
            column = next(c for c, name in CLASS_OF_COLUMN.items() if name == classes[label])
            clear = votes(**{"surprise" if column == "neutral" else "neutral": 2, column: 8})
            counts = rules.get(relative) if split == "train" else None
            rows.append([split, f"{split}/{relative}", "0", *map(str, counts or clear)])
    path = root / "ferplus.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "path", "fer_index", *VOTE_COLUMNS])
        writer.writerows(rows + (extra_rows or []))
    return path


@pytest.fixture
def voted_dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset with a ferplus.csv that exercises every rule."""
    root = tmp_path / "voted"
    shutil.copytree(tiny_dataset, root)
    write_votes(root, RULES)
    return root


def train_votes(root: Path) -> tuple[tuple[str, ...], list[str], SplitVotes]:
    classes, files = list_split(root / "train")
    paths = [str(path.relative_to(root / "train")) for path, _ in files]
    return classes, paths, read_votes(root / "ferplus.csv", "train", tuple(paths))


def test_majority_takes_a_unique_top_class_and_leaves_out_ties_and_foreign_tops(voted_dataset: Path) -> None:
    classes, paths, split_votes = train_votes(voted_dataset)
    majority = ferplus_majority(split_votes, classes)
    by_path = dict(zip(paths, majority, strict=True))
    assert by_path["angry/0.png"] == classes.index("angry")
    assert by_path["angry/1.png"] == NO_LABEL  # tie
    assert by_path["angry/10.png"] == NO_LABEL  # NF on top
    assert by_path["angry/11.png"] == NO_LABEL  # contempt on top
    assert by_path["angry/12.png"] == NO_LABEL  # no row
    _, files = list_split(voted_dataset / "train")
    for path, label in files:  # every file the rules leave alone has its folder's class as majority
        if str(path.relative_to(voted_dataset / "train")) not in (*RULES, "angry/12.png"):
            assert by_path[str(path.relative_to(voted_dataset / "train"))] == label


def test_vote_distribution_drops_lone_votes_and_images_that_are_mostly_not_ours(voted_dataset: Path) -> None:
    classes, paths, split_votes = train_votes(voted_dataset)
    targets, usable = vote_distribution(split_votes, classes)
    row = {path: (targets[i], bool(usable[i])) for i, path in enumerate(paths)}
    angry, neutral, sad, disgust = (classes.index(n) for n in ("angry", "neutral", "sad", "disgust"))
    target, is_usable = row["angry/0.png"]
    assert is_usable and target[angry] == pytest.approx(6 / 9) and target[neutral] == pytest.approx(3 / 9)
    assert target[sad] == 0.0
    target, is_usable = row["angry/1.png"]
    assert is_usable and target[angry] == pytest.approx(0.5) and target[neutral] == pytest.approx(0.5)
    assert not row["angry/10.png"][1]  # 3 of 10 votes are for our classes
    target, is_usable = row["angry/11.png"]
    assert is_usable and target[angry] == pytest.approx(0.5) and target[disgust] == pytest.approx(0.5)
    assert not row["angry/12.png"][1]
    assert np.allclose(targets[usable].sum(axis=1), 1.0)


def test_training_targets_per_mode(voted_dataset: Path) -> None:
    classes, paths, split_votes = train_votes(voted_dataset)
    _, files = list_split(voted_dataset / "train")
    labels = np.array([label for _, label in files])
    original, keep = training_targets(labels, classes, "original", None)
    assert keep.all() and (original.argmax(1) == labels).all() and (original.sum(1) == 1).all()
    majority, keep = training_targets(labels, classes, "majority", split_votes)
    assert keep.sum() == len(paths) - 4  # the tie, NF, contempt and missing rows
    soft, keep = training_targets(labels, classes, "votes", split_votes)
    assert keep.sum() == len(paths) - 2  # NF and missing rows
    blend, keep = training_targets(labels, classes, "votes", split_votes, original_weight=0.5)
    assert keep.all()  # a dropped image keeps its folder label
    index = paths.index("angry/0.png")
    assert blend[index][classes.index("angry")] == pytest.approx(0.5 + 0.5 * 6 / 9)
    missing = paths.index("angry/12.png")
    assert blend[missing].tolist() == original[missing].tolist()
    agreed, keep = training_targets(labels, classes, "agreed", split_votes)
    assert keep.all()  # every image, its folder label where the crowd disagrees or has no majority
    assert agreed[index].tolist() == soft[index].tolist()  # angry/0: the crowd's majority is angry too
    for disagreeing in ("angry/1.png", "angry/10.png", "angry/11.png", "angry/12.png"):  # tie, NF, contempt, no row
        assert agreed[paths.index(disagreeing)].tolist() == original[paths.index(disagreeing)].tolist()
    with pytest.raises(ValueError, match="needs the FER\\+ votes file"):
        training_targets(labels, classes, "votes", None)
    with pytest.raises(ValueError, match="label mode must be one of"):
        training_targets(labels, classes, "crowd", split_votes)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train", "train/angry/999.png", "0", *["1"] * 10], "is not in the train folder"),
        (["test", "test/angry/0.png", "0", *["1"] * 10], "neither train nor val"),
        (["train", "train/angry/0.png", "0", *["1"] * 10], "has a second row"),
    ],
)
def test_loader_refuses_votes_for_other_files_in_one_line(
    voted_dataset: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_votes(voted_dataset, RULES, extra_rows=[extra])
    with pytest.raises(ValueError, match=message):
        train_votes(voted_dataset)
    argv = ["--data-dir", str(voted_dataset), "--run-dir", str(voted_dataset / "run"), "--label-mode", "votes"]
    assert train.main([*argv, *tiny_flags(voted_dataset)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["original", "majority", "votes"])
def test_each_label_mode_trains_and_stores_both_truths(voted_dataset: Path, tmp_path: Path, mode: str) -> None:
    output = tmp_path / "model.pth"
    argv = ["--data-dir", str(voted_dataset), "--run-dir", str(tmp_path / "run"), "--output", str(output)]
    argv += ["--label-mode", mode, "--logit-adjustment", "0.5", "--perspective", "0.2", "--blur-probability", "0.5"]
    argv += ["--gamma-range", "0.3", "--contrast-range", "0.3"]
    assert train.main([*argv, *tiny_flags(tmp_path)]) == 0
    raw = torch.load(output, map_location="cpu", weights_only=True)
    expected_images = {"original": 140, "majority": 136, "votes": 138}[mode]
    assert raw["training"]["images"] == expected_images
    assert raw["training"]["config"]["label_mode"] == mode
    # the prior of the targets trained on, and tau = 0.5: the served one is its square root, normalised
    classes, files = list_split(voted_dataset / "train")
    labels = np.array([label for _, label in files])
    split_votes = train_votes(voted_dataset)[2]
    targets, keep = training_targets(labels, classes, mode, None if mode == "original" else split_votes)
    prior = targets[keep].mean(axis=0)
    assert list(raw["training"]["target_prior"].values()) == pytest.approx(prior.tolist(), abs=1e-4)
    served = np.sqrt(prior) / np.sqrt(prior).sum()
    assert list(raw["training"]["served_prior"].values()) == pytest.approx(served.tolist(), abs=1e-3)
    metrics = raw["metrics"]
    assert metrics["truth"] == evaluate.ORIGINAL_TRUTH
    assert metrics["ferplus"]["truth"] == evaluate.FERPLUS_TRUTH
    assert metrics["ferplus"]["num_images"] == 28  # every val file has a clear majority here
    assert "val_ferplus_accuracy" in raw["training"]["history"][0]


@pytest.mark.slow
def test_both_truths_round_trip_through_the_checkpoint_and_metrics(voted_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "model.pth"
    argv = ["--data-dir", str(voted_dataset), "--run-dir", str(tmp_path / "run"), "--output", str(output)]
    assert train.main([*argv, *tiny_flags(tmp_path)]) == 0
    # Votes that disagree with the folder on every val image: the two truths must differ.
    classes, files = list_split(voted_dataset / "val")
    rows = [
        ["val", f"val/{path.relative_to(voted_dataset / 'val')}", "0", *map(str, votes(neutral=9, fear=1))]
        for path, _ in files
    ]
    write_votes(voted_dataset, RULES)
    with (voted_dataset / "ferplus.csv").open() as handle:
        kept = [row for row in csv.reader(handle) if row[0] != "val"]
    with (voted_dataset / "ferplus.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(kept + rows)
    json_path = tmp_path / "metrics.json"
    argv = ["--checkpoint", str(output), "--data-dir", str(voted_dataset), "--precision", "fp32"]
    assert evaluate.main([*argv, "--write-metrics", "--json", str(json_path), "--log-level", "WARNING"]) == 0
    stored = torch.load(output, map_location="cpu", weights_only=True)["metrics"]
    ferplus = stored["ferplus"]
    assert ferplus["per_class"]["neutral"]["support"] == 28 and ferplus["num_images"] == 28
    predicted_neutral = sum(row[classes.index("neutral")] for row in stored["confusion_matrix"])
    assert ferplus["accuracy"] == pytest.approx(predicted_neutral / 28)
    assert stored["per_class"]["neutral"]["support"] == 4  # the original labels: 4 a class
    with app_serving(checkpoint=output, precision="fp32") as server:
        body = get(f"{server.url}/metrics").json()
    assert body["truth"] == evaluate.ORIGINAL_TRUTH
    assert body["accuracy"] == stored["accuracy"]
    assert body["ferplus"]["truth"] == evaluate.FERPLUS_TRUTH
    assert body["ferplus"]["accuracy"] == ferplus["accuracy"]
    assert body["ferplus"]["macro_f1"] == ferplus["macro_f1"]
    assert body["ferplus"]["confusion_matrix"] == ferplus["confusion_matrix"]
    assert "ferplus" not in body["extra"]


def test_figures_without_the_votes_keep_the_other_modes_but_not_their_ferplus_blocks(tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint, save_checkpoint, store_metrics
    from models.network import build_network

    path = tmp_path / "model.pth"
    save_checkpoint(path, build_network("EmotionRecognitionModelPyTorch"))
    same_way = {"split": "val", "num_images": 28, "precision": "fp32"}
    with_votes = {"accuracy": 0.5, "tta": "none", "ferplus": {"accuracy": 0.6}, **same_way}
    store_metrics(path, with_votes, {"flip": {"accuracy": 0.55, "tta": "flip", "ferplus": {"accuracy": 0.65}}})
    assert load_checkpoint(path).figures.metrics_for("flip")["ferplus"] == {"accuracy": 0.65}
    store_metrics(path, {"accuracy": 0.5, "tta": "none", **same_way})  # measured again without ferplus.csv
    checkpoint = load_checkpoint(path)
    assert checkpoint.figures.measured_tta_modes() == ("none", "flip")
    assert "ferplus" not in checkpoint.figures.metrics_for("flip") and "ferplus" not in checkpoint.figures.metrics_for(
        "none"
    )
    # and the other way: a FER+ main drops a mode that has no FER+ figures of its own
    store_metrics(path, with_votes)
    assert load_checkpoint(path).figures.measured_tta_modes() == ("none",)
