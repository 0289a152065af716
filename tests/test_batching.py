from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.batching import MicroBatcher, QueueFullError
from models.predictor import Predictor
from tests.conftest import SHIPPED_CHECKPOINT


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_checkpoint(SHIPPED_CHECKPOINT)


def test_concurrent_submits_share_one_forward_pass(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=200, queue_size=64)
    try:
        inputs = torch.randn(10, 1, 48, 48).clamp(-1, 1)
        futures = [batcher.submit(x) for x in inputs]
        results = [future.result(timeout=30) for future in futures]
    finally:
        batcher.close()
    assert {result.batch_size for result in results} == {10}
    alone = predictor.predict_tensors(inputs)
    for row, result in zip(alone, results, strict=True):
        assert result.probabilities == pytest.approx(row, abs=1e-3)


def test_faces_that_ask_for_another_tta_get_it_in_a_pass_of_their_own(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=200, queue_size=64)
    modes = [None, "tencrop", None, "flip", "tencrop", None]
    try:
        inputs = torch.randn(len(modes), 1, 48, 48).clamp(-1, 1)
        futures = [batcher.submit(x, mode) for x, mode in zip(inputs, modes, strict=True)]
        results = [future.result(timeout=30) for future in futures]
    finally:
        batcher.close()
    # One gathering of six faces: a forward pass per mode, each the size of its group.
    assert [result.batch_size for result in results] == [3, 2, 3, 1, 2, 3]
    for mode in (None, "tencrop", "flip"):
        rows = [i for i, asked in enumerate(modes) if asked == mode]
        expected = predictor.predict_tensors(inputs[rows], mode)
        for row, i in zip(expected, rows, strict=True):
            assert results[i].probabilities == pytest.approx(row, abs=1e-3)
    assert not np.allclose(results[1].probabilities, predictor.predict_tensors(inputs[1:2])[0], atol=1e-3)


def test_in_a_mixed_gathering_the_cheaper_mode_is_answered_first(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=200, queue_size=64)
    answered: list[str] = []
    try:
        futures = []
        for mode in ("tencrop", "flip", None, "tencrop"):
            future = batcher.submit(torch.zeros(1, 48, 48), mode)
            future.add_done_callback(lambda _, mode=mode: answered.append(str(mode)))
            futures.append(future)
        for future in futures:
            future.result(timeout=30)
    finally:
        batcher.close()
    assert answered == ["None", "flip", "tencrop", "tencrop"]  # the served mode (none), then by views per face


def test_by_default_a_lone_request_runs_without_waiting_for_company(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor)  # the service's defaults
    try:
        assert batcher.max_wait_s == 0
        assert batcher.submit(torch.zeros(1, 48, 48)).result(timeout=30).batch_size == 1
    finally:
        batcher.close()


def test_without_waiting_requests_that_queue_during_a_pass_share_the_next(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=32, max_wait_ms=0, queue_size=64)
    try:
        # Submitting 40 takes microseconds; the first forward pass takes milliseconds.
        futures = [batcher.submit(torch.zeros(1, 48, 48)) for _ in range(40)]
        sizes = [future.result(timeout=30).batch_size for future in futures]
    finally:
        batcher.close()
    assert max(sizes) > 1
    assert batcher.batches_run < 40


def test_a_failing_batch_fails_only_its_own_requests(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=8, max_wait_ms=0, queue_size=8)
    try:
        broken = batcher.submit(torch.zeros(1, 30, 30))  # the network cannot take this shape
        with pytest.raises(RuntimeError):
            broken.result(timeout=30)
        healthy = batcher.submit(torch.zeros(1, 48, 48)).result(timeout=30)
    finally:
        batcher.close()
    assert healthy.probabilities.sum() == pytest.approx(1.0)


def test_full_queue_refuses_at_once(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=1, max_wait_ms=0, queue_size=1)
    try:
        with pytest.raises(QueueFullError, match="at capacity"):
            for _ in range(1000):
                batcher.submit(torch.zeros(1, 48, 48))
    finally:
        batcher.close()


def test_close_finishes_queued_work(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=4, max_wait_ms=1, queue_size=64)
    futures = [batcher.submit(torch.zeros(1, 48, 48)) for _ in range(20)]
    batcher.close()
    assert all(future.result(timeout=1).probabilities.shape == (7,) for future in futures)


def test_settings_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from app.settings import Settings, settings_error_line

    settings = Settings()
    assert (settings.port, settings.max_batch_files, settings.max_upload_bytes, settings.max_pixels) == (
        8000, 64, 10 * 1024 * 1024, 40_000_000,
    )  # fmt: skip
    assert settings.checkpoint == Path(SHIPPED_CHECKPOINT)
    monkeypatch.setenv("FER_PORT", "70000")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert settings_error_line(error.value).startswith("invalid settings: FER_PORT='70000'")
