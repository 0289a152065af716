"""The micro-batcher, without a server: what forms a batch, what each face gets, what fails.

Every gathering is made deterministic with a gate: the worker is held inside a forward pass
while the test queues faces, so what forms the next batch does not depend on thread timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.batching import MicroBatcher
from models.config import ENGINE_DEFAULTS
from models.errors import QueueFullError
from models.predictor import Predictor
from models.tta import TtaMode
from tests.conftest import SHIPPED_CHECKPOINT


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_checkpoint(SHIPPED_CHECKPOINT)


class GatedPredictor:
    """The real predictor, but each forward pass waits for the gate and records its size and mode."""

    def __init__(self, real: Predictor) -> None:
        self.real = real
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.passes: list[tuple[int, TtaMode | None]] = []

    def predict_tensors(self, inputs: torch.Tensor, tta: TtaMode | None = None) -> np.ndarray:
        self.inside.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        self.passes.append((len(inputs), tta))
        return self.real.predict_tensors(inputs, tta)


@pytest.fixture()
def gated(predictor: Predictor) -> Iterator[tuple[GatedPredictor, MicroBatcher]]:
    """A batcher whose worker is held inside a first, one-face pass until the test opens the gate."""
    gate = GatedPredictor(predictor)
    batcher = MicroBatcher(gate, max_batch=16, max_wait_ms=0, queue_size=64)  # type: ignore[arg-type]
    blocker = batcher.submit(torch.zeros(1, 48, 48), "none")
    assert gate.inside.wait(timeout=30)
    try:
        yield gate, batcher
    finally:
        gate.gate.set()
        blocker.result(timeout=30)
        batcher.close()


def test_faces_queued_during_a_pass_share_the_next_one(
    gated: tuple[GatedPredictor, MicroBatcher], predictor: Predictor
) -> None:
    gate, batcher = gated
    inputs = torch.randn(10, 1, 48, 48).clamp(-1, 1)
    futures = [batcher.submit(x, "none") for x in inputs]
    gate.gate.set()
    results = [future.result(timeout=30) for future in futures]
    assert gate.passes == [(1, "none"), (10, "none")]
    assert {result.batch_size for result in results} == {10}
    for row, result in zip(predictor.predict_tensors(inputs), results, strict=True):
        assert result.probabilities == pytest.approx(row, abs=1e-3)


def test_a_gathering_larger_than_max_batch_is_split(gated: tuple[GatedPredictor, MicroBatcher]) -> None:
    gate, batcher = gated
    futures = [batcher.submit(torch.zeros(1, 48, 48), "none") for _ in range(20)]
    gate.gate.set()
    assert [future.result(timeout=30).batch_size for future in futures] == [16] * 16 + [4] * 4
    assert gate.passes == [(1, "none"), (16, "none"), (4, "none")]


def test_faces_that_ask_for_another_tta_get_it_in_a_pass_of_their_own(
    gated: tuple[GatedPredictor, MicroBatcher], predictor: Predictor
) -> None:
    gate, batcher = gated
    modes: list[TtaMode] = ["none", "tencrop", "none", "flip", "tencrop", "none"]
    inputs = torch.randn(len(modes), 1, 48, 48).clamp(-1, 1)
    futures = [batcher.submit(x, mode) for x, mode in zip(inputs, modes, strict=True)]
    gate.gate.set()
    results = [future.result(timeout=30) for future in futures]
    # One gathering of six faces: a forward pass per mode, each the size of its group, cheapest first.
    assert gate.passes[1:] == [(3, "none"), (1, "flip"), (2, "tencrop")]
    assert [result.batch_size for result in results] == [3, 2, 3, 1, 2, 3]
    for mode in ("none", "tencrop", "flip"):
        rows = [i for i, asked in enumerate(modes) if asked == mode]
        expected = predictor.predict_tensors(inputs[rows], mode)
        for row, i in zip(expected, rows, strict=True):
            assert results[i].probabilities == pytest.approx(row, abs=1e-3)
    assert not np.allclose(results[1].probabilities, predictor.predict_tensors(inputs[1:2])[0], atol=1e-3)


def test_in_a_mixed_gathering_the_cheaper_mode_is_answered_first(gated: tuple[GatedPredictor, MicroBatcher]) -> None:
    gate, batcher = gated
    answered: list[str] = []
    futures = []
    for mode in ("tencrop", "flip", "none", "tencrop"):
        future = batcher.submit(torch.zeros(1, 48, 48), mode)  # type: ignore[arg-type]
        future.add_done_callback(lambda _, mode=mode: answered.append(mode))
        futures.append(future)
    gate.gate.set()
    for future in futures:
        future.result(timeout=30)
    assert answered == ["none", "flip", "tencrop", "tencrop"]  # by views per face


def test_by_default_a_lone_request_runs_without_waiting_for_company(predictor: Predictor) -> None:
    defaults = ENGINE_DEFAULTS
    batcher = MicroBatcher(predictor, defaults.max_batch, defaults.max_wait_ms, defaults.queue_size)
    try:
        assert batcher.max_wait_s == 0
        assert batcher.submit(torch.zeros(1, 48, 48), "none").result(timeout=30).batch_size == 1
    finally:
        batcher.close()


def test_a_failing_batch_fails_only_its_own_requests(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=8, max_wait_ms=0, queue_size=8)
    try:
        broken = batcher.submit(torch.zeros(1, 30, 30), "none")  # the network cannot take this shape
        with pytest.raises(Exception):  # noqa: B017  # torch's RuntimeError or ONNX Runtime's own, by precision
            broken.result(timeout=30)
        healthy = batcher.submit(torch.zeros(1, 48, 48), "none").result(timeout=30)
    finally:
        batcher.close()
    assert healthy.probabilities.sum() == pytest.approx(1.0)


def test_full_queue_refuses_at_once(gated: tuple[GatedPredictor, MicroBatcher]) -> None:
    _, batcher = gated
    for _ in range(64):  # the worker is held, so the queue fills to its size exactly
        batcher.submit(torch.zeros(1, 48, 48), "none")
    with pytest.raises(QueueFullError, match="at capacity"):
        batcher.submit(torch.zeros(1, 48, 48), "none")


def test_close_finishes_queued_work(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor, max_batch=4, max_wait_ms=1, queue_size=64)
    futures = [batcher.submit(torch.zeros(1, 48, 48), "none") for _ in range(20)]
    batcher.close()
    assert all(future.result(timeout=1).probabilities.shape == (7,) for future in futures)
