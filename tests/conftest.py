"""Shared fixtures: a tiny generated dataset, the real data when present, one in-process server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import CLASSES, load_checkpoint
from models.predictor import Predictor
from models.preprocessing import preprocess

if TYPE_CHECKING:
    from tests.server import AppServer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CHECKPOINT = ROOT / "models" / "checkpoint.pth"

# Ray reads its authentication mode once per process, when it first starts or joins a cluster, and
# a local `ray.init()` where a token exists turns token mode on in os.environ for good: the tests
# that drive Ray in this process (a local cluster, the loopback clusters of `ray start`) would
# then each meet the mode an earlier one left. One mode for all of them; the test of joining with
# a token runs its clusters and commands in child processes with their own environment.
os.environ["RAY_AUTH_MODE"] = "disabled"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` first, the longest (`seconds=`) first of all, so that `make test`'s two
    workers do not end on one long test.

    Scheduling only: every test stands alone and passes in any order (-k, one file, one worker).
    A module-scoped fixture used by slow and other tests alike may be set up twice; none costly is.
    """

    def longest_first(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -float(slow.kwargs.get("seconds", 0)) if slow else 0.0

    items.sort(key=longest_first)  # stable: file order otherwise


def make_face(seed: int, size: int = 48) -> Image.Image:
    """A deterministic grayscale 'face': a bright ellipse with dark eyes and a mouth, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    face = 60 + 140 * (((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1)
    for cx in (0.35, 0.65):
        face = np.where(((xx - cx) ** 2 + (yy - 0.4) ** 2) < 0.004, 30, face)
    mouth_y = 0.7 + 0.05 * rng.uniform(-1, 1)
    face = np.where((abs(yy - mouth_y) < 0.03) & (abs(xx - 0.5) < 0.15 + 0.1 * rng.uniform()), 40, face)
    face = face + rng.normal(0, 12, face.shape)
    return Image.fromarray(np.clip(face, 0, 255).astype(np.uint8), mode="L")


def reference_probabilities(
    image: Image.Image, *, checkpoint: Path = SHIPPED_CHECKPOINT, precision: str = "auto", tta: str = "checkpoint"
) -> dict[str, float]:
    """What the predictor computes for one image, in process: class → probability, in checkpoint order."""
    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded, precision=precision, tta=tta)  # type: ignore[arg-type]
    row = predictor.predict_tensors(np.stack([preprocess(image, loaded.preprocessing)]))[0]
    return {name: float(p) for name, p in zip(loaded.classes, row, strict=True)}


def write_dataset(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A folder layout root/<class>/<n>.png with the given number of generated faces per class."""
    for index, name in enumerate(sorted(per_class)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class[name]):
            make_face(seed * 1000 + index * 100 + n).save(folder / f"{n}.png")
    return root


@pytest.fixture
def ray_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Ray cluster at a time across the suite's workers (`make test` runs two).

    Two clusters starting at once on two cores starve each other: a GCS that misses its start-up
    deadline ("Failed to start GCS"). The lock file lives in the run's temporary root, which
    every worker shares.
    """
    import fcntl

    with (tmp_path_factory.getbasetemp().parent / "ray-clusters.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with a few generated faces in each of the seven classes."""
    root = tmp_path_factory.mktemp("fer-tiny")
    write_dataset(root / "train", {name: 20 for name in CLASSES}, seed=1)
    write_dataset(root / "val", {name: 4 for name in CLASSES}, seed=2)
    return root


@pytest.fixture(scope="session")
def fer2013_dir() -> Path:
    """The real FER2013 folder from $FER2013_DIR; skips the test when it is not there."""
    value = os.environ.get("FER2013_DIR")
    if not value:
        pytest.skip("FER2013_DIR is not set: the full-val checks need the real dataset")
    path = Path(value)
    if not (path / "val").is_dir():
        pytest.skip(f"FER2013_DIR={value} has no val/ folder: the full-val checks need the real dataset")
    return path


@pytest.fixture(scope="session")
def server() -> Iterator[AppServer]:
    """The service with its default settings and the shipped checkpoint, in process, shared by every module."""
    from tests.server import app_serving

    with app_serving(checkpoint=SHIPPED_CHECKPOINT) as running:
        yield running
