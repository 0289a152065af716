"""Batch uploads wait for room in the batching queue in arrival order, and give up at their deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from app.queue_room import QueueRoom
from models.batching import BatchResult, MicroBatcher, QueueFullError
from models.predictor import Predictor
from tests.conftest import SHIPPED_CHECKPOINT


class GatedPredictor:
    """Answers like a predictor, but each forward pass waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def resolve_tta(self, tta: str | None) -> str:
        return tta or "none"

    def predict_tensors(self, inputs: torch.Tensor, tta: str | None = None) -> np.ndarray:
        self.started.set()
        self.gate.wait(timeout=30)
        return np.full((len(inputs), 7), 1 / 7)


def faces(count: int) -> list[torch.Tensor]:
    return [torch.zeros(1, 48, 48) for _ in range(count)]


async def submit_and_wait(room: QueueRoom, batcher: MicroBatcher, count: int, patience_s: float) -> list[float]:
    """One upload: submit `count` faces through the room; the monotonic time each result arrived."""
    finished: list[float] = []

    def stamp(future: Future[BatchResult]) -> None:
        finished.append(time.monotonic())

    deadline = asyncio.get_running_loop().time() + patience_s
    futures = await room.submit_all(batcher.submit, faces(count), deadline)
    for future in futures:
        future.add_done_callback(stamp)
    await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
    return finished


def test_uploads_larger_than_the_queue_are_served_whole_and_in_arrival_order() -> None:
    predictor = Predictor.from_checkpoint(SHIPPED_CHECKPOINT)
    batcher = MicroBatcher(predictor, max_batch=4, queue_size=4)

    async def three_uploads() -> list[list[float]]:
        room = QueueRoom(asyncio.get_running_loop())
        batcher.add_room_listener(room.notify_threadsafe)
        uploads = []
        for _ in range(3):  # 3 × 40 faces through a queue of 4
            uploads.append(asyncio.create_task(submit_and_wait(room, batcher, 40, patience_s=60)))
            await asyncio.sleep(0)  # let it take its place in line
        return list(await asyncio.gather(*uploads))

    try:
        first, second, third = asyncio.run(three_uploads())
    finally:
        batcher.close()
    assert len(first) == len(second) == len(third) == 40
    # Each upload's faces went in together: the first upload was done before the second's faces were answered.
    assert max(first) <= min(second) and max(second) <= min(third)


def test_an_upload_that_finds_no_room_by_its_deadline_gets_queue_full_and_its_queued_faces_are_dropped() -> None:
    predictor = GatedPredictor()
    batcher = MicroBatcher(predictor, max_batch=1, queue_size=2)  # type: ignore[arg-type]
    try:
        blocker = batcher.submit(torch.zeros(1, 48, 48))
        assert predictor.started.wait(timeout=10)  # the worker is inside a forward pass and will stay there
        submitted: list[Future[BatchResult]] = []

        def submit(face: torch.Tensor) -> Future[BatchResult]:
            future = batcher.submit(face)
            submitted.append(future)
            return future

        async def upload() -> None:
            room = QueueRoom(asyncio.get_running_loop())
            batcher.add_room_listener(room.notify_threadsafe)
            try:
                deadline = asyncio.get_running_loop().time() + 0.3
                await room.submit_all(submit, faces(3), deadline)
            finally:
                batcher.remove_room_listener(room.notify_threadsafe)

        started = time.monotonic()
        with pytest.raises(QueueFullError, match="at capacity"):
            asyncio.run(upload())
        assert 0.3 <= time.monotonic() - started < 5
        assert len(submitted) == 2 and all(future.cancelled() for future in submitted)  # the third never fit
        predictor.gate.set()
        assert blocker.result(timeout=10).batch_size == 1
        assert batcher.submit(torch.zeros(1, 48, 48)).result(timeout=10).batch_size == 1  # serving again
    finally:
        predictor.gate.set()
        batcher.close()


def test_a_room_listener_that_fails_does_not_stop_the_batcher() -> None:
    predictor = Predictor.from_checkpoint(SHIPPED_CHECKPOINT)
    batcher = MicroBatcher(predictor, max_batch=2, queue_size=4)
    loop = asyncio.new_event_loop()
    room = QueueRoom(loop)
    loop.close()  # a room whose event loop is gone, as after a server shut down

    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("listener bug")

    batcher.add_room_listener(room.notify_threadsafe)
    batcher.add_room_listener(broken)
    try:
        assert batcher.submit(torch.zeros(1, 48, 48)).result(timeout=30).batch_size == 1
        batcher.remove_room_listener(broken)
        batcher.remove_room_listener(room.notify_threadsafe)
        assert batcher.submit(torch.zeros(1, 48, 48)).result(timeout=30).batch_size == 1
        assert len(calls) == 1  # removed listeners are not called again
    finally:
        batcher.close()
