"""Micro-batching: concurrent requests share one call to the embedder.

The model is the expensive part of tier 1 and its cost per text falls steeply
with batch size. A lone request is encoded at once; while the model is busy,
later requests queue and go together in the next batch (up to `max_batch`
texts, after waiting at most `max_wait_ms` for company). Encoding runs on one
long-lived worker thread, never on the event loop. Vectors of recent texts
are kept in an LRU cache (a vector depends only on the text and the model, so
it can never be stale).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from dataclasses import dataclass

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
    """

    max_batch: int = 64
    max_wait_ms: float = 0.0
    cache_size: int = 10_000


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
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            if self._config.max_wait_ms > 0 and queue.empty():
                await asyncio.sleep(self._config.max_wait_ms / 1000)
            while len(batch) < self._config.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(text, future) for text, future in batch if not future.cancelled()]
            if not live:
                continue
            try:
                vectors = await loop.run_in_executor(
                    self._executor, self._embedder.encode, [text for text, _ in live]
                )
            except Exception as exc:  # the model failed: fail these requests, keep serving
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), vector in zip(live, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)

    async def aclose(self) -> None:
        """Stop the worker and release the thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)
