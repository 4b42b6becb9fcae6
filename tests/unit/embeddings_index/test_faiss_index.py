"""The FAISS snapshot: exact cosine search, labels, atomic swap."""

from __future__ import annotations

import numpy as np

from embeddings_index.faiss_index import ExemplarIndex, IndexHolder


def unit(v: list[float]) -> np.ndarray:
    a = np.array(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def make(version: int = 1) -> ExemplarIndex:
    vectors = np.vstack([unit([1, 0, 0]), unit([0, 1, 0]), unit([1, 1, 0])])
    return ExemplarIndex(version=version, model_id="m", ids=["x", "y", "xy"],
                         labels=["risky", "benign", "risky"], categories=["c1", "benign", "c2"],
                         vectors=vectors)  # fmt: skip


def test_search_returns_nearest_first_with_labels() -> None:
    index = make()
    [result] = index.search(unit([1, 0.1, 0])[None, :], k=3)
    assert [index.ids[p] for p in result.positions] == ["x", "xy", "y"]
    assert list(result.risky) == [True, True, False]
    assert result.similarities[0] > result.similarities[1] > result.similarities[2]
    assert result.similarities[0] <= 1.0 + 1e-6


def test_k_larger_than_index_and_empty_index() -> None:
    [result] = make().search(unit([0, 0, 1])[None, :], k=10)
    assert len(result.positions) == 3
    empty = ExemplarIndex(version=0, model_id="m", ids=[], labels=[], categories=[],
                          vectors=np.zeros((0, 3), dtype=np.float32))  # fmt: skip
    [nothing] = empty.search(unit([1, 0, 0])[None, :], k=5)
    assert len(nothing.positions) == 0


def test_holder_swaps_forward_only() -> None:
    holder = IndexHolder(make(version=2))
    old = holder.current
    holder.swap(make(version=3))
    assert holder.current.version == 3
    holder.swap(make(version=1))  # a late, older rebuild never wins
    assert holder.current.version == 3
    assert old.version == 2  # whoever held the old snapshot still has it intact
