"""The configured embedding backend, for the server and the offline tools alike."""

from __future__ import annotations

from embeddings_index.embedder import Embedder, SentenceTransformerEmbedder
from gateway.runtime.config import Config, EmbeddingBackend

__all__ = ["make_embedder"]


def make_embedder(config: Config) -> Embedder:
    """The configured embedding backend; ONNX exports (once) into the models directory."""
    embedding = config.embedding
    if embedding.backend is EmbeddingBackend.TORCH:
        return SentenceTransformerEmbedder(embedding.model_path)
    from embeddings_index.onnx_embedder import OnnxEmbedder

    return OnnxEmbedder(
        embedding.models_dir or config.data_dir / "models",
        embedding.model_path,
        quantize=embedding.backend is EmbeddingBackend.ONNX_INT8,
        token_budget=embedding.token_budget,
        max_batch=embedding.max_batch,
        threads=embedding.threads or None,
    )
