"""A deterministic embedder for the fast test lane: hashed words and character n-grams.

A test double, not product code: it implements the `embeddings_index.embedder.Embedder`
protocol without any model, so pipeline tests can build a real `Gateway` (store,
FAISS index, router, critics) in a second instead of loading torch. Texts that
share words and character trigrams get similar vectors, so the index behaves
like an index; the scores mean nothing for routing quality, which is why tests
on this embedder steer routing with policy thresholds, not with its scores.

Every feature is hashed with blake2b (not `hash()`, which changes per process)
into one of `dim` buckets with a sign, then each row is L2-normalised.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["HashingEmbedder"]

_WORD = re.compile(r"\w+")


class HashingEmbedder:
    """Feature hashing of lower-cased words and character trigrams into `dim` dimensions.

    Args:
        dim: Vector length; 384 like all-MiniLM-L6-v2 so the index sees familiar shapes.
        ngram: Length of the character n-grams (inside ` word ` padding).
    """

    def __init__(self, dim: int = 384, *, ngram: int = 3) -> None:
        self._dim = dim
        self._ngram = ngram
        self._ids: dict[str, int] = {}  # word -> row of its hashed features
        self._rows: list[np.ndarray] = []
        self._stacked = np.zeros((0, dim), dtype=np.float32)
        self._lock = threading.Lock()  # the gateway's micro-batcher calls from worker threads

    @property
    def model_id(self) -> str:
        """Distinct from every real model's id, so its vectors never mix with theirs."""
        return f"test-hashing:{self._dim}:{self._ngram}"

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text; a text without words gets a fixed unit vector."""
        with self._lock:
            rows = [[self._word_id(w) for w in _WORD.findall(text.lower())] for text in texts]
            matrix = self._matrix()
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, ids in enumerate(rows):
            if ids:
                out[row] = matrix[ids].sum(axis=0)
        norms = np.linalg.norm(out, axis=1)
        empty = norms == 0
        out[empty, 0] = 1.0
        norms[empty] = 1.0
        return np.ascontiguousarray(out / norms[:, None], dtype=np.float32)

    def _word_id(self, word: str) -> int:
        """The word's row in the vocabulary matrix, hashing its features the first time."""
        word_id = self._ids.get(word)
        if word_id is None:
            vector = np.zeros(self._dim, dtype=np.float32)
            padded, n = f" {word} ", self._ngram
            features = [(f"w:{word}", 1.0)] + [
                (f"c:{padded[i : i + n]}", 0.5) for i in range(len(padded) - n + 1)
            ]
            for feature, weight in features:
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                vector[value % self._dim] += weight if value >> 63 else -weight
            word_id = self._ids[word] = len(self._rows)
            self._rows.append(vector)
        return word_id

    def _matrix(self) -> np.ndarray:
        """Every known word's vector, one row each (rebuilt only after new words)."""
        if len(self._stacked) != len(self._rows):
            self._stacked = np.vstack(self._rows)
        return self._stacked
