"""FER2013 in the Kaggle folder layout, decoded once into a uint8 array cache.

Every file goes through `models.preprocessing` (decode → grayscale → resize), the same path the
service uses; the cache stores the (N, 48, 48) uint8 result and is rebuilt when the folder's
file list, sizes or modification times change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.decoding import IMAGE_SUFFIXES, decode_image
from models.preprocessing import PreprocessingSpec, face_pixels

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("../shared/datasets/fer2013")


@dataclass(frozen=True)
class Split:
    """One split held in memory: pixels (N, size, size) uint8, labels (N,) int64."""

    pixels: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_data_dir() -> Path:
    """`$FER2013_DIR`, or ../shared/datasets/fer2013 beside the project."""
    return Path(os.environ.get("FER2013_DIR", DEFAULT_DATA_DIR))


def list_split(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class folders in sorted order are the class indices; returns (classes, [(file, label)])."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such folder (expected one sub-folder per class)")
    classes = tuple(sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir()))
    if not classes:
        raise FileNotFoundError(f"{split_dir}: no class sub-folders")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
    return classes, files


def _fingerprint(split_dir: Path, files: list[tuple[Path, int]], spec: PreprocessingSpec) -> str:
    digest = hashlib.sha256(repr(sorted(spec.to_dict().items())).encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(split_dir)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` to a temporary file beside `path`, then renamed into place: whole or not at all.

    A temporary name of its own for each writer: torchrun ranks build the same cache at the same
    time, and a shared name let one rank rename the file away under the other. A run killed while
    writing leaves no file that looks usable.
    """
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def load_split(split_dir: Path, spec: PreprocessingSpec, cache_dir: Path | None = None) -> Split:
    """Decode a split folder into memory, through the cache when `cache_dir` is given."""
    split_dir = Path(split_dir)
    classes, files = list_split(split_dir)
    cache_file = None
    if cache_dir is not None:
        key = _fingerprint(split_dir, files, spec)
        cache_file = Path(cache_dir) / f"{split_dir.name}-{key}.npz"
        if cache_file.is_file():
            with np.load(cache_file, allow_pickle=False) as cached:
                return Split(
                    pixels=cached["pixels"],
                    labels=cached["labels"],
                    classes=tuple(str(c) for c in cached["classes"]),
                    paths=tuple(str(p) for p in cached["paths"]),
                )
    pixels = np.empty((len(files), spec.size, spec.size), dtype=np.uint8)
    for index, (path, _) in enumerate(files):
        pixels[index] = face_pixels(decode_image(path.read_bytes()), spec)
    labels = np.array([label for _, label in files], dtype=np.int64)
    paths = tuple(str(path.relative_to(split_dir)) for path, _ in files)
    split = Split(pixels=pixels, labels=labels, classes=classes, paths=paths)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomically(cache_file, pixels=pixels, labels=labels, classes=np.array(classes), paths=np.array(paths))
        logger.info("cached %d images of %s in %s", len(split), split_dir, cache_file)
    return split
