"""Batches made ahead of the training step on a producer thread, without moving the saved position.

The producer owns the `BatchStream` once started: it makes a batch, snapshots the stream's position right after
it (`BatchStream.snapshot`, made plain only when a checkpoint asks), and queues both (bounded queue, so it runs
at most `prefetch` batches ahead). The consumer takes a batch and keeps the position that came with it, so
`state_dict()` is the position after the last *consumed* batch and a checkpoint never includes the read-ahead: a
resumed run continues with the batch the interrupted one would have trained on next. Tokenization (Rust) and
`pin_memory` release the GIL, so the producer overlaps the step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from galore_train.data.stream import Batch, BatchStream

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1  # how often a blocked producer or consumer checks for shutdown
CLOSE_SECONDS = 30.0  # how long `close` waits for a batch in the making (a stalled hub read must not hang exit)


class _Stop:
    """Queued by the producer when it ends with an error (carried in `error`)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PretrainingStream:
    """The training stream as the loop sees it: `next_batch`, `state_dict`, `load_state_dict`, `epoch`, `close`.

    `prefetch=0` makes batches on the calling thread. `pin_memory` (use it only when batches go to a CUDA
    device) puts batches in page-locked memory so `.to(device, non_blocking=True)` copies asynchronously.
    `wait_seconds` accumulates the time `next_batch` blocked; `take_wait_seconds()` reads and resets it.
    """

    def __init__(self, *args: Any, prefetch: int = 0, pin_memory: bool = False, **kwargs: Any) -> None:
        self.stream = BatchStream(*args, **kwargs)
        self.tokenize = self.stream.tokenize
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.wait_seconds = 0.0
        self._state: dict[str, Any] | None = None  # after the last consumed batch; None: ask the stream
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._behind = False  # the stream ran ahead of `_state` (a producer was stopped)
        self._stream_lost = False  # a stopped producer never ended: the stream must not be touched

    # --- the consumer side ---------------------------------------------------------------------
    def next_batch(self) -> Batch:
        start = time.perf_counter()
        if self.prefetch == 0:
            batch, remapped = self._make()
            self._state = None
        else:
            batch, remapped, self._state = self._take()
        self.tokenize.remapped_ids += remapped  # counted when consumed, on this thread
        self.wait_seconds += time.perf_counter() - start
        return batch

    def take_wait_seconds(self) -> float:
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited

    def state_dict(self) -> dict[str, Any]:
        return self.stream.plain(self._state) if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self._check_stream()
        self.stream.load_state_dict(state)
        self._state = None
        self._behind = False

    @property
    def epoch(self) -> int:
        return self._state["epoch"] if self._state is not None else self.stream.epoch

    def close(self) -> None:
        """Stop the producer (idempotent). Batches it made ahead are dropped; the stream is rewound to the
        consumed position only if batches are asked for again (reopening a hub stream is not free)."""
        if self._thread is None:
            return
        self._stopping.set()
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()
            self._thread.join(POLL_SECONDS)
        self._drain()
        if self._thread.is_alive():  # a daemon: it ends with the process; the stream is its own until then
            log.warning("the data producer thread did not stop within %.0f s; leaving it", CLOSE_SECONDS)
            self._stream_lost = True
        self._thread = None
        self._behind = True

    def __enter__(self) -> PretrainingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> tuple[Batch, int, dict[str, Any]]:
        if self._thread is None:
            self._start()
        while True:
            alive = self._thread.is_alive()  # checked before the wait: whatever it queued before ending is seen
            try:
                item = self._queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not alive:
                    raise RuntimeError("the data producer thread ended without a batch or an error") from None
        if isinstance(item, _Stop):
            self.close()
            raise item.error
        return item

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # --- the producer side ---------------------------------------------------------------------
    def _check_stream(self) -> None:
        if self._stream_lost:
            raise RuntimeError("the data stream is still held by a producer thread that did not stop")

    def _start(self) -> None:
        self._check_stream()
        if self._behind:
            self.stream.load_state_dict(self._state)
            self._behind = False
        if self._state is None:
            self._state = self.stream.snapshot()  # the position before the first queued batch
        self._stopping.clear()
        self._thread = threading.Thread(target=self._produce, name="galore-train-data", daemon=True)
        self._thread.start()

    def _make(self) -> tuple[Batch, int]:
        batch, remapped = self.stream.produce()
        if self.pin_memory:
            batch = {key: value.pin_memory() for key, value in batch.items()}
        return batch, remapped

    def _produce(self) -> None:
        try:
            while not self._stopping.is_set():
                batch, remapped = self._make()
                self._put((batch, remapped, self.stream.snapshot()))
        except BaseException as error:  # re-raised on the consumer's thread
            self._put(_Stop(error))

    def _put(self, item: Any) -> None:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue


def pin_batches(device: torch.device) -> bool:
    """Page-locked batches pay off only for copies to a CUDA device (and need CUDA to exist)."""
    return device.type == "cuda" and torch.cuda.is_available()
