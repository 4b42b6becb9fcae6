"""The starter exemplar pack that ships with tierguard (written by the project).

`sync_starter_pack` keeps a store in step with the pack: exemplars new to the
pack are added, exemplars dropped from it are removed, and an exemplar an
admin removed stays removed (the store remembers every id it ever held).

The pack's vectors ship precomputed (`starter/vectors.npz`, float16, written
by `scripts/embed_starter.py`), keyed by a hash of the text the embedder
reads, so a fresh server starts in seconds; any text without a matching
vector (a changed exemplar, a different model) is embedded at start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from embeddings_index.store import LABELS, Exemplar, ExemplarStore

__all__ = [
    "STARTER_DIR",
    "STARTER_SOURCE",
    "VECTORS_FILE",
    "StarterPackError",
    "load_precomputed_vectors",
    "load_starter_pack",
    "save_precomputed_vectors",
    "sync_starter_pack",
    "vector_key",
]

STARTER_DIR = Path(__file__).resolve().parent / "starter"
VECTORS_FILE = STARTER_DIR / "vectors.npz"
STARTER_SOURCE = "tierguard-starter"
_META_KEY = "starter_pack_sha256"


class StarterPackError(ValueError):
    """A starter pack file is malformed; the message names the file and line."""


def load_starter_pack(directory: Path = STARTER_DIR) -> list[Exemplar]:
    """Every exemplar of the `*.jsonl` files in `directory`, validated."""
    exemplars: list[Exemplar] = []
    seen: set[str] = set()
    for path in sorted(directory.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StarterPackError(f"{where}: not valid JSON: {exc}") from exc
            for key in ("id", "text", "label", "category"):
                if not isinstance(raw.get(key), str) or not raw[key].strip():
                    raise StarterPackError(f"{where}: field {key!r} is required")
            if raw["label"] not in LABELS:
                raise StarterPackError(f"{where}: label must be one of {LABELS}")
            if raw["id"] in seen:
                raise StarterPackError(f"{where}: duplicate id {raw['id']!r}")
            seen.add(raw["id"])
            exemplars.append(
                Exemplar(
                    id=raw["id"],
                    text=raw["text"],
                    label=raw["label"],
                    category=raw["category"],
                    source=STARTER_SOURCE,
                    lang=str(raw.get("lang", "")),
                    added_by=STARTER_SOURCE,
                    reason="shipped starter pack",
                )
            )
    return exemplars


def _pack_digest(exemplars: list[Exemplar]) -> str:
    digest = hashlib.sha256()
    for e in exemplars:
        digest.update(f"{e.id}\0{e.text}\0{e.label}\0{e.category}\n".encode())
    return digest.hexdigest()


def vector_key(prepared_text: str, model_id: str) -> str:
    """Key of a precomputed vector: the text the embedder read, and the model."""
    return hashlib.sha256(f"{model_id}\0{prepared_text}".encode()).hexdigest()


def save_precomputed_vectors(
    keys: list[str], vectors: np.ndarray, path: Path = VECTORS_FILE
) -> None:
    """Write vectors (as float16) with their keys."""
    np.savez_compressed(path, keys=np.array(keys), vectors=vectors.astype(np.float16))


def load_precomputed_vectors(path: Path = VECTORS_FILE) -> dict[str, np.ndarray]:
    """Key -> unit float32 vector; empty when the file is missing."""
    if not path.is_file():
        return {}
    with np.load(path) as data:
        vectors = data["vectors"].astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return dict(zip(data["keys"].tolist(), vectors, strict=True))


def _vectors_for(
    texts: list[str],
    encode: Callable[[list[str]], np.ndarray],
    embedding_model: str,
    precomputed: Mapping[str, np.ndarray],
) -> np.ndarray:
    keys = [vector_key(t, embedding_model) for t in texts]
    missing = [i for i, key in enumerate(keys) if key not in precomputed]
    fresh = dict(zip(missing, encode([texts[i] for i in missing]), strict=True)) if missing else {}
    return np.vstack([fresh[i] if i in fresh else precomputed[key] for i, key in enumerate(keys)])


def sync_starter_pack(
    store: ExemplarStore,
    encode: Callable[[list[str]], np.ndarray],
    *,
    embedding_model: str,
    prepare: Callable[[str], str] = str,
    directory: Path = STARTER_DIR,
    precomputed: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Bring the store in step with the shipped pack; returns how many exemplars were added.

    Args:
        encode: Embeds prepared texts.
        prepare: What the embedder reads for a text (tier-0 normalisation).
        precomputed: Vectors by `vector_key`; None loads the shipped file.
    """
    pack = load_starter_pack(directory)
    digest = _pack_digest(pack)
    if store.get_meta(_META_KEY) == digest:
        return 0
    known = store.known_ids()
    new = [e for e in pack if e.id not in known]
    if new:
        if precomputed is None:
            precomputed = load_precomputed_vectors()
        vectors = _vectors_for([prepare(e.text) for e in new], encode, embedding_model, precomputed)
        # skip_existing: another process bringing the same pack in at once is no conflict
        store.add(new, vectors, embedding_model=embedding_model, skip_existing=True)
    in_pack = {e.id for e in pack}
    for exemplar in store.list_all(source=STARTER_SOURCE):
        if exemplar.id not in in_pack:
            store.delete(exemplar.id)
    store.set_meta(_META_KEY, digest)
    return len(new)
