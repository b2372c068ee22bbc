"""Batches assembled off the training thread: :class:`Prefetcher` runs any batch iterator (e.g.
``CacheReader.batches`` wrapped by ``kdcache.train.batch_stream``) on a thread a few batches ahead of the
trainer; :func:`pin_batch` puts a batch in page-locked memory so host-to-GPU copies overlap compute.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch

__all__ = ["Prefetcher", "pin_batch"]
T = TypeVar("T")


def pin_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch in page-locked memory (for asynchronous host-to-GPU copies); unchanged without CUDA."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


class Prefetcher(Generic[T]):
    """Runs ``items`` on a background thread, up to ``depth`` items ahead of the consumer, applying
    ``transform`` there (e.g. a vocabulary mapping and :func:`pin_batch`); iterating it yields the same
    items in the same order. ``waited_s``: total seconds ``next`` waited for the thread (the trainer's
    stall). ``close()`` stops the thread and closes ``items`` on it (a generator's ``finally`` runs there).
    An exception in the thread is raised by the ``next`` that reaches it.
    """

    def __init__(self, items: Iterator[T], *, depth: int = 2, transform: Callable[[T], T] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self.waited_s = 0.0
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items, transform), name="kdcache-batches", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[T], transform: Callable[[T], T] | None) -> None:
        try:
            for item in items:
                if not self._offer((True, item if transform is None else transform(item))):
                    return
            self._offer((False, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._offer((False, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _offer(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        start = time.perf_counter()
        ok, item = self._queue.get()
        self.waited_s += time.perf_counter() - start
        if ok:
            return item
        self._done = True
        if item is not None:
            raise item
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (dropping what it read ahead) and wait for it to close ``items``."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
