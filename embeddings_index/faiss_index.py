"""The FAISS index of exemplar vectors, as an immutable snapshot.

An `ExemplarIndex` is never changed after it is built: a change to the
exemplars builds a new one aside, and whoever holds the current one swaps a
reference (`IndexHolder.swap`). Checks in flight keep the snapshot they
started with, so a rebuild never blocks or tears a search.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["ExemplarIndex", "IndexHolder", "Neighbors"]

RISKY, BENIGN = 1, 0


@dataclass(frozen=True, slots=True)
class Neighbors:
    """The k nearest exemplars of one query, most similar first.

    Attributes:
        similarities: Cosine similarities, shape (k',), k' <= k.
        positions: Positions in the index (see `ExemplarIndex.ids`), shape (k',).
        risky: True where the neighbour is a risky exemplar, shape (k',).
    """

    similarities: np.ndarray
    positions: np.ndarray
    risky: np.ndarray


class ExemplarIndex:
    """Exact inner-product search over unit vectors (cosine similarity)."""

    def __init__(
        self,
        *,
        version: int,
        model_id: str,
        ids: Sequence[str],
        labels: Sequence[str],
        categories: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        if not len(ids) == len(labels) == len(categories) == len(vectors):
            raise ValueError("ids, labels, categories and vectors must have the same length")
        self.version = version
        self.model_id = model_id
        self.ids = list(ids)
        self.categories = list(categories)
        self.risky = np.array([label == "risky" for label in labels], dtype=bool)
        dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 0
        self.dim = dim
        self._index = faiss.IndexFlatIP(dim or 1)
        if len(vectors):
            self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, position: int) -> str:
        """The label of the exemplar at `position`."""
        return "risky" if self.risky[position] else "benign"

    def search(self, queries: np.ndarray, k: int) -> list[Neighbors]:
        """The `k` nearest exemplars of each query row (fewer if the index is smaller)."""
        k = min(k, len(self))
        if k <= 0:
            empty = np.zeros(0, dtype=np.float32)
            return [Neighbors(empty, empty.astype(np.int64), empty.astype(bool)) for _ in queries]
        sims, positions = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        results = []
        for row_sims, row_positions in zip(sims, positions, strict=True):
            valid = row_positions >= 0
            row_positions = row_positions[valid]
            results.append(Neighbors(row_sims[valid], row_positions, self.risky[row_positions]))
        return results


class IndexHolder:
    """Holds the current index; `swap` replaces it atomically for new searches."""

    def __init__(self, index: ExemplarIndex) -> None:
        self._index = index
        self._lock = threading.Lock()

    @property
    def current(self) -> ExemplarIndex:
        """The index new searches should use."""
        return self._index

    def swap(self, index: ExemplarIndex) -> None:
        """Make `index` current unless a newer version is already in place."""
        with self._lock:
            if index.version >= self._index.version:
                self._index = index
