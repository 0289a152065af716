"""Micro-batching: gather concurrent requests into one forward pass.

`MicroBatcher.submit` puts one face tensor on a bounded queue and returns a Future at once; a
single worker thread takes up to `max_batch` items, waiting at most `max_wait_ms` after the
first, runs the predictor once and resolves every Future. With the default wait of zero it takes
only what is already queued: a lone request runs at once, and under load the requests that
arrive during one forward pass form the next batch, so batches grow with the load by themselves
(benchmarks/RESULTS.md compares the waits). When the queue is full, `submit`
raises `QueueFullError` immediately instead of letting latency grow without bound; callers
that would rather wait for room register a room listener, which the worker calls each time it
takes a batch off the queue. An exception in a forward pass fails only the Futures of that batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from models.errors import QueueFullError
from models.predictor import Predictor
from models.tta import TTA_VIEWS, TtaMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """One item's probabilities and the size of the batch it was computed in."""

    probabilities: np.ndarray  # (classes,) float64
    batch_size: int


@dataclass
class _Item:
    inputs: np.ndarray  # (1, 48, 48) float32
    future: Future[BatchResult]
    tta: TtaMode  # the TTA mode this face is answered with


class MicroBatcher:
    """Owns the worker thread and the bounded queue in front of a `Predictor`."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float, queue_size: int) -> None:
        """The knobs and their defaults are `models.engine.EngineConfig`'s."""
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be ≥ 1 and max_wait_ms ≥ 0")
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="fer-batcher", daemon=True)
        self._stopped = threading.Event()
        self._room_listeners: list[Callable[[], None]] = []
        self.batches_run = 0
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Items waiting for a forward pass."""
        return self._queue.qsize()

    def submit(self, inputs: np.ndarray, tta: TtaMode) -> Future[BatchResult]:
        """Queue one normalised face (1, 48, 48) to be answered with `tta`; raises `QueueFullError` when full."""
        if self._stopped.is_set():
            raise RuntimeError("the batcher is stopped")
        future: Future[BatchResult] = Future()
        try:
            self._queue.put_nowait(_Item(inputs, future, tta))
        except queue.Full:
            raise QueueFullError(
                f"the service is at capacity ({self._queue.maxsize} images queued): retry in a moment"
            ) from None
        return future

    def add_room_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` from the worker thread each time it frees room in the queue; keep it quick."""
        self._room_listeners = [*self._room_listeners, listener]

    def remove_room_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling a listener added with `add_room_listener`."""
        # `!=`, not `is not`: each `obj.method` access makes a new bound method, equal but not identical.
        self._room_listeners = [known for known in self._room_listeners if known != listener]

    def _announce_room(self) -> None:
        for listener in self._room_listeners:  # a copy-on-write list: safe to iterate while others change it
            try:
                listener()
            except Exception:  # a listener's failure must not stop the worker
                logger.exception("queue-room listener failed")

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        items, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                # Take what is already there without waiting; wait only until the deadline.
                remaining = deadline - time.monotonic()
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            items.append(item)
        return items, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            items, stop = self._gather(first)
            self._announce_room()
            items = [item for item in items if item.future.set_running_or_notify_cancel()]
            for group in by_tta(items):
                self._forward(group)

    def _forward(self, items: list[_Item]) -> None:
        """One forward pass for items that share a TTA mode; resolves their Futures."""
        try:
            probabilities = self.predictor.predict_tensors(np.stack([item.inputs for item in items]), items[0].tta)
        except Exception as exc:  # fail this batch's requests, keep serving the next ones
            logger.exception("forward pass failed for a batch of %d", len(items))
            for item in items:
                item.future.set_exception(exc)
            return
        self.batches_run += 1
        for item, row in zip(items, probabilities, strict=True):
            item.future.set_result(BatchResult(probabilities=row, batch_size=len(items)))


def by_tta(items: list[_Item]) -> list[list[_Item]]:
    """The items grouped by the TTA mode they asked for, each group in queue order, cheapest mode first.

    The views of one mode are one tensor, so a batch that mixes modes takes one pass per mode.
    Cheapest first: a plain face gathered with ten-crop ones then waits for its own short pass
    only, not for their ten views each (the shortest job first keeps the mean wait lowest).
    """
    groups: dict[TtaMode, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.tta, []).append(item)
    return sorted(groups.values(), key=lambda group: TTA_VIEWS[group[0].tta])
