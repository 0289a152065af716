"""benchmarks.kdef's face cache, built from photos through the engine and read back, on a tiny kdef-like folder."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import kdef
from benchmarks.kdef import detected_faces
from models.config import EngineConfig

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


def test_a_cache_cut_by_another_inference_core_is_cut_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = kdef_like_folder(tmp_path / "kdef")
    cache = tmp_path / "faces.npz"
    fresh = detected_faces(folder, cache)
    with np.load(cache) as stored:
        arrays = dict(stored)
    # Stale inputs under today's key are read back as they are: the cache is trusted by its key.
    np.savez(cache, **{**arrays, "inputs": np.zeros_like(arrays["inputs"])})
    assert not detected_faces(folder, cache)[0].any()

    # The same photos and preprocessing, but another engine source: the key differs, the faces are cut again.
    monkeypatch.setattr(kdef, "inference_core_digest", lambda: "another engine")
    again = detected_faces(folder, cache)

    assert torch.equal(again[0], fresh[0])
    with np.load(cache) as stored:
        assert str(stored["key"]) != str(arrays["key"])


def test_the_digest_covers_the_face_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    today = kdef.inference_core_digest()
    assert kdef.inference_core_digest() == today  # stable within a process and checkout
    monkeypatch.setattr(kdef, "EngineConfig", lambda: EngineConfig(threads=1, queue_size=7))
    assert kdef.inference_core_digest() == today  # threads and queues cut the same faces
    monkeypatch.setattr(kdef, "EngineConfig", lambda: EngineConfig(detect_max_side=640))
    assert kdef.inference_core_digest() != today
