"""Micro-batching: concurrent requests share one call to the embedder.

The model is the expensive part of tier 1 and its cost per text falls steeply
with batch size. A lone request is encoded at once; while the model is busy,
later requests queue and go together in the next batch (up to `max_batch`
texts, after waiting at most `max_wait_ms` for company). Encoding runs on one
long-lived worker thread, never on the event loop. Vectors of recent texts
are kept in an LRU cache (a vector depends only on the text and the model, so
it can never be stale).

Waiting texts are encoded shortest first, in calls of at most `max_batch_chars`
characters, and each call's requests are answered as soon as it returns; texts
that arrived meanwhile join the queue before the next call. So a client that
floods the gateway with long texts delays a short prompt by at most one call,
not by everything queued ahead of it. Shortest-first alone would starve a long
text while short ones keep coming, so a text passed over by `max_skipped_calls`
calls goes first in the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from embeddings_index.embedder import Embedder
from embeddings_index.lru import LRUCache

__all__ = ["BatchingConfig", "MicroBatcher"]


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How requests are grouped.

    Attributes:
        max_batch: Most texts in one call to the embedder.
        max_wait_ms: Longest a request waits for others to join its batch
            when the model is idle; 0 sends a lone request at once.
        cache_size: Vectors of recent texts kept (0: no cache).
        max_batch_chars: Most characters in one call (a single longer text goes alone).
        max_skipped_calls: Calls a waiting text may be passed over by shorter
            ones before it goes first.
    """

    max_batch: int = 64
    max_wait_ms: float = 0.0
    cache_size: int = 10_000
    max_batch_chars: int = 8_192
    max_skipped_calls: int = 4

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_batch_chars < 1:
            raise ValueError("max_batch and max_batch_chars must be at least 1")


class MicroBatcher:
    """Queues texts from many coroutines and encodes them in shared batches."""

    def __init__(self, embedder: Embedder, config: BatchingConfig | None = None) -> None:
        self._embedder = embedder
        self._config = config or BatchingConfig()
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tierguard-embed"
        )
        self.cache: LRUCache[str, np.ndarray] = LRUCache(self._config.cache_size)

    async def embed(self, text: str) -> np.ndarray:
        """The unit vector of `text`, from the cache or encoded with whatever else is waiting."""
        cached = self.cache.get(text)
        if cached is not None:
            return cached
        vector = await self._encode_batched(text)
        self.cache.put(text, vector)
        return vector

    async def _encode_batched(self, text: str) -> np.ndarray:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(self._queue), name="tierguard-batcher")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        waiting: list[_Waiting] = []
        calls = 0  # calls made so far: a text's age is the calls since it arrived
        while True:
            if not waiting:
                waiting.append(_Waiting(*await queue.get(), calls))
                if self._config.max_wait_ms > 0 and queue.empty():
                    await asyncio.sleep(self._config.max_wait_ms / 1000)
            while not queue.empty():
                waiting.append(_Waiting(*queue.get_nowait(), calls))
            waiting = [item for item in waiting if not item.future.cancelled()]
            if not waiting:
                continue
            waiting.sort(key=_serving_order(calls - self._config.max_skipped_calls))
            call = _next_call(waiting, self._config.max_batch, self._config.max_batch_chars)
            del waiting[: len(call)]
            calls += 1
            await self._encode_call([(item.text, item.future) for item in call])

    async def _encode_call(self, call: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            vectors = await loop.run_in_executor(
                self._executor, self._embedder.encode, [text for text, _ in call]
            )
        except Exception as exc:  # the model failed: fail these requests, keep serving
            for _, future in call:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), vector in zip(call, vectors, strict=True):
            if not future.done():
                future.set_result(vector)

    async def aclose(self) -> None:
        """Stop the worker and release the thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Waiting(NamedTuple):
    text: str
    future: asyncio.Future[np.ndarray]
    arrived: int  # the number of calls made before it arrived


def _serving_order(overdue: int) -> Callable[[_Waiting], tuple[int, int, int]]:
    """Texts that arrived by call `overdue` first, oldest first; then the rest, shortest first."""

    def key(item: _Waiting) -> tuple[int, int, int]:
        if item.arrived <= overdue:
            return (0, item.arrived, len(item.text))
        return (1, 0, len(item.text))

    return key


def _next_call(waiting: list[_Waiting], max_texts: int, max_chars: int) -> list[_Waiting]:
    """The head of `waiting` (in the order to serve) that fits one call: at least one text."""
    total = 0
    for count, item in enumerate(waiting[:max_texts]):
        total += len(item.text)
        if count and total > max_chars:
            return waiting[:count]
    return waiting[:max_texts]
