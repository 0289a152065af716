"""Batch uploads wait for room in the batching queue in arrival order, and give up at their deadline."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from models.batching import BatchResult, MicroBatcher
from models.errors import QueueFullError
from models.predictor import Predictor
from models.scheduling import QueueTurns
from tests.conftest import SHIPPED_CHECKPOINT


class GatedPredictor:
    """Answers like a predictor, but each forward pass waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def predict_tensors(self, inputs: torch.Tensor, tta: str | None = None) -> np.ndarray:
        self.started.set()
        self.gate.wait(timeout=60)
        return np.full((len(inputs), 7), 1 / 7)


def faces(count: int) -> list[torch.Tensor]:
    return [torch.zeros(1, 48, 48) for _ in range(count)]


async def upload(room: QueueTurns, batcher: MicroBatcher, name: str, count: int, answered: list[str]) -> None:
    """One upload of `count` faces through the room; each answer appends `name` to `answered` as it comes."""
    deadline = asyncio.get_running_loop().time() + 120  # generous: only a hang would reach it
    futures = await room.submit_all(lambda face: batcher.submit(face, "none"), faces(count), deadline)
    for future in futures:
        # Runs on the batcher's thread as each answer is set (or at once for one already answered).
        future.add_done_callback(lambda _: answered.append(name))
    await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))


def test_uploads_larger_than_the_queue_are_served_whole_and_in_arrival_order() -> None:
    batcher = MicroBatcher(Predictor.from_checkpoint(SHIPPED_CHECKPOINT), max_batch=4, max_wait_ms=0, queue_size=4)
    answered: list[str] = []

    async def three_uploads() -> None:
        room = QueueTurns(asyncio.get_running_loop())
        batcher.add_room_listener(room.notify_threadsafe)
        uploads = []
        for name in ("first", "second", "third"):  # 3 × 40 faces through a queue of 4
            uploads.append(asyncio.create_task(upload(room, batcher, name, 40, answered)))
            await asyncio.sleep(0)  # let it take its place in line
        await asyncio.gather(*uploads)

    try:
        asyncio.run(three_uploads())
    finally:
        batcher.close()
    # Each upload's faces went in together: every face of the first was answered before any of the second's.
    assert answered == ["first"] * 40 + ["second"] * 40 + ["third"] * 40


def test_an_upload_that_finds_no_room_by_its_deadline_gets_queue_full_and_its_queued_faces_are_dropped() -> None:
    predictor = GatedPredictor()
    batcher = MicroBatcher(predictor, max_batch=1, max_wait_ms=0, queue_size=2)  # type: ignore[arg-type]
    try:
        blocker = batcher.submit(torch.zeros(1, 48, 48), "none")
        assert predictor.started.wait(timeout=60)  # the worker is inside a forward pass and will stay there
        submitted: list[Future[BatchResult]] = []

        def submit(face: torch.Tensor) -> Future[BatchResult]:
            future = batcher.submit(face, "none")
            submitted.append(future)
            return future

        async def upload_with_a_short_deadline() -> None:
            room = QueueTurns(asyncio.get_running_loop())
            batcher.add_room_listener(room.notify_threadsafe)
            try:
                # No room can come while the gate is shut, so this deadline, however short, is what ends the wait.
                deadline = asyncio.get_running_loop().time() + 0.1
                await room.submit_all(submit, faces(3), deadline)
            finally:
                batcher.remove_room_listener(room.notify_threadsafe)

        with pytest.raises(QueueFullError, match="at capacity"):
            asyncio.run(upload_with_a_short_deadline())
        assert len(submitted) == 2 and all(future.cancelled() for future in submitted)  # the third never fit
        predictor.gate.set()
        assert blocker.result(timeout=60).batch_size == 1
        assert batcher.submit(torch.zeros(1, 48, 48), "none").result(timeout=60).batch_size == 1  # serving again
    finally:
        predictor.gate.set()
        batcher.close()


def test_a_room_listener_that_fails_does_not_stop_the_batcher() -> None:
    batcher = MicroBatcher(Predictor.from_checkpoint(SHIPPED_CHECKPOINT), max_batch=2, max_wait_ms=0, queue_size=4)
    loop = asyncio.new_event_loop()
    room = QueueTurns(loop)
    loop.close()  # a room whose event loop is gone, as after a server shut down

    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("listener bug")

    batcher.add_room_listener(room.notify_threadsafe)
    batcher.add_room_listener(broken)
    try:
        assert batcher.submit(torch.zeros(1, 48, 48), "none").result(timeout=60).batch_size == 1
        batcher.remove_room_listener(broken)
        batcher.remove_room_listener(room.notify_threadsafe)
        assert batcher.submit(torch.zeros(1, 48, 48), "none").result(timeout=60).batch_size == 1
        assert len(calls) == 1  # removed listeners are not called again
    finally:
        batcher.close()
