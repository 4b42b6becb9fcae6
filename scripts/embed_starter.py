"""Precompute the starter pack's vectors (embeddings_index/starter/vectors.npz).

A fresh server then adds the pack without running the model over thousands of
texts. Rerun after editing the pack or the normaliser; a test fails while the
file is stale.

    python scripts/embed_starter.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embeddings_index.embedder import SentenceTransformerEmbedder  # noqa: E402
from embeddings_index.starter import (  # noqa: E402
    VECTORS_FILE,
    load_starter_pack,
    save_precomputed_vectors,
    vector_key,
)
from router.normalize import normalize  # noqa: E402


def main() -> int:
    embedder = SentenceTransformerEmbedder()
    texts = sorted({normalize(e.text).text for e in load_starter_pack()})
    print(f"embedding {len(texts)} starter texts with {embedder.model_id}", flush=True)
    vectors = embedder.encode(texts)
    save_precomputed_vectors([vector_key(t, embedder.model_id) for t in texts], vectors)
    print(f"wrote {VECTORS_FILE.relative_to(ROOT)} ({VECTORS_FILE.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
