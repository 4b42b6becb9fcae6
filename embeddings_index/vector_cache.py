"""Embeddings kept on disk for offline work (evaluation, fitting), so each text is embedded once.

Keys are `starter.vector_key` (the model and the text the embedder read), the
same keys as the shipped starter-pack vectors, so those can be looked up
instead of embedded again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from embeddings_index.starter import vector_key

__all__ = ["VectorCache"]


class VectorCache:
    """Vectors by `vector_key`, read from and written to one `.npz` file.

    Args:
        path: The `.npz` file (created on `save`); None keeps vectors in memory only.
        model_id: Vectors of different models never mix.
        known: Vectors computed elsewhere under the same keys (e.g. the shipped
            starter pack's); looked up, never written to `path`.
    """

    def __init__(
        self,
        path: Path | None,
        model_id: str,
        *,
        known: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.path = Path(path) if path else None
        self.model_id = model_id
        self._known = known or {}
        self._vectors: dict[str, np.ndarray] = {}
        self._dirty = False
        if self.path and self.path.is_file():
            with np.load(self.path) as data:
                self._vectors = dict(
                    zip(data["keys"].tolist(), data["vectors"].astype(np.float32), strict=True)
                )

    def __len__(self) -> int:
        return len(self._vectors)

    def vectors(
        self, prepared_texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """Vectors of `prepared_texts`, embedding (once) only those not cached or known."""
        keys = [vector_key(t, self.model_id) for t in prepared_texts]
        missing = {
            k: t
            for k, t in zip(keys, prepared_texts, strict=True)
            if k not in self._vectors and k not in self._known
        }
        if missing:
            fresh = encode(list(missing.values()))
            for key, vector in zip(missing, fresh, strict=True):
                self._vectors[key] = np.asarray(vector, dtype=np.float32)
            self._dirty = True
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.vstack([self._vectors[k] if k in self._vectors else self._known[k] for k in keys])

    def save(self) -> None:
        """Write the cache if anything was added."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        keys = list(self._vectors)
        np.savez(tmp, keys=np.array(keys), vectors=np.vstack([self._vectors[k] for k in keys]))
        tmp.replace(self.path)
        self._dirty = False
