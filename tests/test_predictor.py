"""Test-time augmentation in the predictor: the views it averages and what it returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.predictor import Predictor
from models.preprocessing import PreprocessingSpec
from models.tta import TtaMode, tta_views
from tests.conftest import SHIPPED_CHECKPOINT

TENCROP_RESIZE = PreprocessingSpec().tencrop_resize


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return (np.random.default_rng(0).random((3, 1, 48, 48), dtype=np.float32) * 2 - 1).astype(np.float32)


def test_ten_crop_views_are_five_crops_of_the_enlarged_face_and_their_mirrors(faces: np.ndarray) -> None:
    assert load_checkpoint(SHIPPED_CHECKPOINT).preprocessing.tencrop_resize == TENCROP_RESIZE == 52
    views = tta_views(faces, "tencrop", TENCROP_RESIZE)
    assert views.shape == (10 * 3, 1, 48, 48) and views.dtype == np.float32
    crops, mirrors = views[:15].reshape(5, 3, 1, 48, 48), views[15:].reshape(5, 3, 1, 48, 48)
    assert np.array_equal(mirrors, crops[..., ::-1])
    # The enlargement is torch's bilinear interpolation (half-pixel centres), to within float32 rounding.
    enlarged = torch.nn.functional.interpolate(
        torch.from_numpy(faces), size=(TENCROP_RESIZE, TENCROP_RESIZE), mode="bilinear"
    ).numpy()
    np.testing.assert_allclose(crops[0], enlarged[..., :48, :48], atol=1e-5)  # top-left
    np.testing.assert_allclose(crops[3], enlarged[..., -48:, -48:], atol=1e-5)  # bottom-right
    np.testing.assert_allclose(crops[4], enlarged[..., 2:50, 2:50], atol=1e-5)  # centre
    assert np.array_equal(tta_views(faces, "none", TENCROP_RESIZE), faces)
    assert np.array_equal(tta_views(faces, "flip", TENCROP_RESIZE), np.concatenate([faces, faces[..., ::-1]]))


@pytest.mark.parametrize("mode", ["none", "flip", "tencrop"])
def test_each_face_gets_the_same_answer_alone_or_in_a_batch(faces: np.ndarray, mode: TtaMode) -> None:
    predictor = Predictor(load_checkpoint(SHIPPED_CHECKPOINT), precision="fp32", tta=mode)
    together = predictor.predict_tensors(faces)
    alone = np.concatenate([predictor.predict_tensors(face[None]) for face in faces])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together.sum(axis=1), 1.0, atol=1e-12)


def test_ten_crop_averages_the_probabilities_of_its_views(faces: np.ndarray) -> None:
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    tencrop = Predictor(checkpoint, precision="fp32", tta="tencrop").predict_tensors(faces)
    plain = Predictor(checkpoint, precision="fp32", tta="none")
    views = plain.predict_tensors(tta_views(faces, "tencrop", TENCROP_RESIZE)).reshape(10, 3, -1)
    np.testing.assert_allclose(tencrop, views.mean(axis=0), atol=1e-5)
    assert not np.allclose(tencrop, plain.predict_tensors(faces), atol=1e-3)


def test_unknown_tta_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="tta must be one of none, flip, tencrop"):
        Predictor(load_checkpoint(SHIPPED_CHECKPOINT), tta="twentycrop")  # type: ignore[arg-type]


def test_checkpoint_means_the_mode_the_stored_metrics_were_measured_with() -> None:
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    assert Predictor(checkpoint).tta == checkpoint.figures.measured_tta == checkpoint.metrics.get("tta", "none")
