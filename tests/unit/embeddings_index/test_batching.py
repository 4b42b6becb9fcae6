"""The micro-batcher: shared calls, shortest first, each call answered as it returns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from embeddings_index.batching import BatchingConfig, MicroBatcher
from tests.fakes.embedder import HashingEmbedder


class RecordingEmbedder:
    """Wraps the hashing embedder: records each call's texts and can hold the first call."""

    def __init__(self, *, fail_on: str = "") -> None:
        self._inner = HashingEmbedder()
        self.calls: list[list[str]] = []
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.hold.set()
        self._fail_on = fail_on
        self.on_call: Callable[[], object] = lambda: None

    @property
    def model_id(self) -> str:
        return self._inner.model_id

    @property
    def dim(self) -> int:
        return self._inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.on_call()
        self.holding.set()
        self.hold.wait(timeout=10)
        if self._fail_on and self._fail_on in texts:
            raise RuntimeError("the model failed")
        return self._inner.encode(texts)


async def _start_held_call(embedder: RecordingEmbedder, batcher: MicroBatcher) -> asyncio.Task:
    """A first request whose call the embedder holds, so the next ones queue behind it."""
    embedder.hold.clear()
    embedder.holding.clear()
    first = asyncio.create_task(batcher.embed("the first request"))
    await asyncio.to_thread(embedder.holding.wait, 10)
    return first


async def test_concurrent_requests_get_their_own_vectors() -> None:
    embedder = RecordingEmbedder()
    batcher = MicroBatcher(embedder, BatchingConfig(cache_size=0))
    texts = [f"question number {i} about my card" for i in range(40)]
    try:
        vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))
    finally:
        await batcher.aclose()
    np.testing.assert_allclose(np.vstack(vectors), HashingEmbedder().encode(texts), atol=1e-6)


async def test_a_short_prompt_is_not_held_behind_queued_long_texts() -> None:
    embedder = RecordingEmbedder()
    batcher = MicroBatcher(embedder, BatchingConfig(cache_size=0, max_batch_chars=8_000))
    long_texts = [f"{i} " + "lorem ipsum dolor sit amet " * 200 for i in range(4)]  # ~5.4k each
    try:
        first = await _start_held_call(embedder, batcher)
        floods = [asyncio.create_task(batcher.embed(t)) for t in long_texts]
        short = asyncio.create_task(batcher.embed("how do I reset my password?"))
        await asyncio.sleep(0.05)  # every request is queued behind the held call
        embedder.hold.set()
        await asyncio.gather(first, short, *floods)
    finally:
        await batcher.aclose()
    # the call after the held one starts with the short prompt, and no call but a
    # lone text goes over the character budget
    assert embedder.calls[1][0] == "how do I reset my password?"
    assert all(len(c) == 1 or sum(map(len, c)) <= 8_000 for c in embedder.calls)
    assert sorted(t for c in embedder.calls[1:] for t in c if t in long_texts) == sorted(long_texts)
    assert len(embedder.calls) >= 4  # the long texts did not all go in one call


async def test_a_long_text_is_not_starved_by_a_stream_of_short_ones() -> None:
    embedder = RecordingEmbedder()
    config = BatchingConfig(cache_size=0, max_batch=1, max_skipped_calls=3)
    batcher = MicroBatcher(embedder, config)
    long_text = "a long document " * 100
    loop = asyncio.get_running_loop()
    stream: list[asyncio.Future] = []

    def one_more_short_text() -> None:  # a new short prompt arrives during every call
        if len(stream) < 10:
            stream.append(asyncio.ensure_future(batcher.embed(f"short {len(stream)}")))

    embedder.on_call = lambda: loop.call_soon_threadsafe(one_more_short_text)
    try:
        first = await _start_held_call(embedder, batcher)
        waiting = [asyncio.create_task(batcher.embed(long_text))]
        one_more_short_text()
        await asyncio.sleep(0.05)
        embedder.hold.set()
        await asyncio.gather(first, *waiting)
        while len(stream) < 10 or not all(f.done() for f in stream):
            await asyncio.sleep(0.01)
    finally:
        await batcher.aclose()
    served = [c[0] for c in embedder.calls]
    # passed over by three calls of newer, shorter texts, then served first
    assert served.index(long_text) == 1 + 3
    assert len(served) == 12


async def test_a_failed_call_fails_only_its_requests() -> None:
    embedder = RecordingEmbedder(fail_on="poison " * 40)
    batcher = MicroBatcher(embedder, BatchingConfig(cache_size=0, max_batch_chars=100))
    try:
        first = await _start_held_call(embedder, batcher)
        poisoned = asyncio.create_task(batcher.embed("poison " * 40))
        fine = asyncio.create_task(batcher.embed("fine"))
        await asyncio.sleep(0.05)
        embedder.hold.set()
        await first
        assert (await fine).shape == (embedder.dim,)
        with pytest.raises(RuntimeError, match="the model failed"):
            await poisoned
        assert (await batcher.embed("still serving")).shape == (embedder.dim,)
    finally:
        await batcher.aclose()
