"""benchmarks.kdef's face cache, built from photos through the engine and read back, on a tiny kdef-like folder."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.kdef import detected_faces

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


def kdef_like_folder(root: Path) -> Path:
    """Two photos named as kdef-dev names them: a real face, frontal (S), and a blank half profile (HL)."""
    (root / "happy").mkdir(parents=True)
    (root / "fear").mkdir()
    shutil.copy(ASTRONAUT, root / "happy" / "AF01HAS.JPG")
    blank = io.BytesIO()
    Image.new("RGB", (562, 762), (128, 128, 128)).save(blank, format="JPEG")
    (root / "fear" / "AF01AFHL.JPG").write_bytes(blank.getvalue())
    return root


def test_faces_are_cut_through_the_engine_then_read_back_from_the_cache(tmp_path: Path) -> None:
    folder = kdef_like_folder(tmp_path / "kdef")
    cache = tmp_path / "cache" / "faces.npz"

    inputs, labels, angles, found = detected_faces(folder, cache)

    assert isinstance(inputs, torch.Tensor)
    assert inputs.dtype == torch.float32 and tuple(inputs.shape) == (2, 1, 48, 48)
    assert labels == ["fear", "happy"] and angles == ["HL", "S"]  # sorted by path
    assert found.tolist() == [False, True]  # the blank photo still yields an input, counted as no face
    assert cache.is_file()

    again = detected_faces(folder, cache)
    assert torch.equal(again[0], inputs)
    assert again[1:3] == (labels, angles)
    np.testing.assert_array_equal(again[3], found)


def test_a_cache_cut_by_other_code_or_settings_is_cut_again(tmp_path: Path) -> None:
    folder = kdef_like_folder(tmp_path / "kdef")
    cache = tmp_path / "faces.npz"
    fresh = detected_faces(folder, cache)
    with np.load(cache) as stored:
        arrays = dict(stored)
    # The same photos, but faces cut by another version of the engine: the key differs, the inputs are stale.
    np.savez(cache, **{**arrays, "key": "0123456789ab", "inputs": np.zeros_like(arrays["inputs"])})

    again = detected_faces(folder, cache)

    assert torch.equal(again[0], fresh[0])
    with np.load(cache) as stored:
        assert str(stored["key"]) == str(arrays["key"])
