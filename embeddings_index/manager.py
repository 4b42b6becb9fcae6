"""Keeps the FAISS index in step with the exemplar store.

`IndexManager.open` is what a server calls at start: open the store, bring the
shipped starter pack in, re-embed anything another model embedded, build the
index. Writes go to the store first (durable), then a new index is built
aside and swapped in; searches in flight keep the old snapshot.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from embeddings_index.embedder import Embedder
from embeddings_index.faiss_index import ExemplarIndex, IndexHolder, IndexOptions
from embeddings_index.snapshot import load_snapshot, save_snapshot
from embeddings_index.starter import STARTER_DIR, sync_starter_pack
from embeddings_index.store import Exemplar, ExemplarStore, text_key
from embeddings_index.vocabulary import AddStatus

__all__ = ["AddOutcome", "IndexManager"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddOutcome:
    """What happened to one exemplar of a checked add.

    Attributes:
        status: Added, or a duplicate or near-duplicate of `exemplar_id`.
        exemplar_id: The new exemplar's id, or the one it duplicates.
        similarity: Cosine similarity to that exemplar (duplicates: 1.0).
    """

    status: AddStatus
    exemplar_id: str
    similarity: float


class IndexManager:
    """The exemplar store, the embedder that fills it, and the current index."""

    def __init__(
        self,
        store: ExemplarStore,
        embedder: Embedder,
        *,
        prepare: Callable[[str], str] = str,
        index_options: IndexOptions | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.prepare = prepare
        self.index_options = index_options or IndexOptions()
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._write_lock = threading.RLock()
        self._holder = IndexHolder(self._load_or_build())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed exemplar texts as queries are embedded (after `prepare`)."""
        return self.embedder.encode([self.prepare(t) for t in texts])

    @classmethod
    def open(
        cls,
        data_dir: Path,
        embedder: Embedder,
        *,
        prepare: Callable[[str], str] = str,
        starter_dir: Path | None = STARTER_DIR,
        index_options: IndexOptions | None = None,
        snapshot_dir: Path | None = None,
    ) -> IndexManager:
        """Open (or create) the store under `data_dir` and build (or load) the index.

        Args:
            data_dir: Directory for `exemplars.sqlite3`.
            embedder: Embeds exemplars that have no vector of its model yet.
            prepare: Turns an exemplar's text into what the embedder reads; it
                must match what queries go through (tier-0 normalisation).
            starter_dir: The starter pack to keep in step with, or None for none.
            index_options: Exact or approximate structure and its knobs (defaults if None).
            snapshot_dir: Where to save the built index and load it from at the
                next start (`<data_dir>/index` by convention); None: always rebuild.
        """
        store = ExemplarStore(Path(data_dir) / "exemplars.sqlite3")
        if starter_dir is not None:
            added = sync_starter_pack(
                store,
                embedder.encode,
                embedding_model=embedder.model_id,
                prepare=prepare,
                directory=starter_dir,
            )
            if added:
                log.info("added %d starter exemplars from %s", added, starter_dir)
        _reembed_stale(store, embedder, prepare)
        return cls(
            store, embedder, prepare=prepare, index_options=index_options, snapshot_dir=snapshot_dir
        )

    @property
    def index(self) -> ExemplarIndex:
        """The current index snapshot."""
        return self._holder.current

    def _load_or_build(self) -> ExemplarIndex:
        if self.snapshot_dir is not None:
            index = load_snapshot(
                self.snapshot_dir,
                version=self.store.version,
                model_id=self.embedder.model_id,
                options=self.index_options,
            )
            if index is not None and len(index) == self.store.count():
                log.info(
                    "loaded the index snapshot of version %d from %s",
                    index.version,
                    self.snapshot_dir,
                )
                return index
        index = self._build()
        self._save(index)
        return index

    def _save(self, index: ExemplarIndex) -> None:
        # An exact index rebuilds from the store in moments; only an approximate
        # one (minutes of training at scale) is worth writing to disk.
        if self.snapshot_dir is not None and index.approximate:
            save_snapshot(self.snapshot_dir, index)

    def _build(self) -> ExemplarIndex:
        exemplars, vectors, missing = self.store.live_vectors(self.embedder.model_id)
        if missing:
            raise RuntimeError(f"{len(missing)} exemplars lack vectors of {self.embedder.model_id}")
        if not len(vectors):
            vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        return ExemplarIndex(
            version=self.store.version,
            model_id=self.embedder.model_id,
            ids=[e.id for e in exemplars],
            labels=[e.label for e in exemplars],
            categories=[e.category for e in exemplars],
            vectors=vectors,
            options=self.index_options,
        )

    def refresh(self) -> ExemplarIndex:
        """Rebuild the index from the store and swap it in."""
        with self._write_lock:
            index = self._build()
            self._holder.swap(index)
            self._save(index)
        return index

    def _changed(
        self,
        version: int,
        *,
        added: Sequence[Exemplar] = (),
        vectors: np.ndarray | None = None,
        removed: Sequence[str] = (),
    ) -> None:
        """Swap in an index at `version`, the store's state after one add or delete.

        An approximate index takes the change on the side (`with_changes`: no
        retraining) while its changes since the build stay within `max_delta`
        and it is exactly one version behind; anything else is a full rebuild,
        as for an exact index.
        """
        current = self.index
        if not (
            current.approximate
            and version == current.version + 1
            and current.changes_since_build + len(added) + len(removed)
            <= self.index_options.max_delta
        ):
            self.refresh()
            return
        index = current.with_changes(
            version=version,
            ids=[e.id for e in added],
            labels=[e.label for e in added],
            categories=[e.category for e in added],
            vectors=vectors,
            removed_ids=removed,
        )
        self._holder.swap(index)
        self._save(index)

    def add(self, exemplars: Sequence[Exemplar], vectors: np.ndarray | None = None) -> int:
        """Store exemplars durably, then swap in an index that has them; returns the version."""
        if vectors is None:
            vectors = self.encode([e.text for e in exemplars])
        exemplars = [e if e.id else replace(e, id=f"ex-{uuid.uuid4().hex[:16]}") for e in exemplars]
        with self._write_lock:
            version = self.store.add(exemplars, vectors, embedding_model=self.embedder.model_id)
            self._changed(version, added=exemplars, vectors=vectors)
        return version

    def add_checked(
        self, exemplars: Sequence[Exemplar], *, near_duplicate_similarity: float
    ) -> tuple[list[AddOutcome], int]:
        """Add what is new; report exact and near duplicates (of live exemplars or of the batch).

        Returns:
            (one outcome per exemplar, in order; the index version afterwards).
        """
        vectors = self.encode([e.text for e in exemplars])
        with self._write_lock:  # checks and write in one step: no race between two admins
            return self._add_new(exemplars, vectors, near_duplicate_similarity)

    def _add_new(
        self, exemplars: Sequence[Exemplar], vectors: np.ndarray, threshold: float
    ) -> tuple[list[AddOutcome], int]:
        existing = self.store.find_by_text([e.text for e in exemplars])
        index = self.index
        nearest = index.search(vectors, 1) if len(index) else []
        outcomes: list[AddOutcome] = []
        keep: list[int] = []
        seen_keys: dict[str, int] = {}
        for i, exemplar in enumerate(exemplars):
            key = text_key(exemplar.text)
            if key in existing:
                outcomes.append(AddOutcome(AddStatus.DUPLICATE, existing[key].id, 1.0))
            elif key in seen_keys:
                outcomes.append(
                    AddOutcome(AddStatus.DUPLICATE, outcomes[seen_keys[key]].exemplar_id, 1.0)
                )
            elif (
                nearest and len(nearest[i].positions) and (nearest[i].similarities[0] >= threshold)
            ):
                position = int(nearest[i].positions[0])
                similarity = float(nearest[i].similarities[0])
                outcomes.append(
                    AddOutcome(AddStatus.NEAR_DUPLICATE, index.ids[position], similarity)
                )
            else:
                within = [j for j in keep if float(vectors[i] @ vectors[j]) >= threshold]
                if within:
                    similarity = float(vectors[i] @ vectors[within[0]])
                    outcomes.append(
                        AddOutcome(
                            AddStatus.NEAR_DUPLICATE, outcomes[within[0]].exemplar_id, similarity
                        )
                    )
                else:
                    exemplar_id = exemplar.id or f"ex-{uuid.uuid4().hex[:16]}"
                    outcomes.append(AddOutcome(AddStatus.ADDED, exemplar_id, 0.0))
                    keep.append(i)
                    seen_keys[key] = i
        if not keep:
            return outcomes, self.index.version
        added = [replace(exemplars[i], id=outcomes[i].exemplar_id) for i in keep]
        version = self.add(added, vectors[keep])
        return outcomes, version

    def rollback(self, to_version: int) -> tuple[int, int, int]:
        """Restore the exemplar set of `to_version` as a new version and swap it in."""
        with self._write_lock:
            result = self.store.rollback(to_version)
            self.refresh()
        return result

    def delete(self, exemplar_id: str) -> int | None:
        """Remove an exemplar durably and swap in an index without it; None if it was not live."""
        with self._write_lock:
            version = self.store.delete(exemplar_id)
            if version is not None:
                self._changed(version, removed=[exemplar_id])
        return version


def _reembed_stale(store: ExemplarStore, embedder: Embedder, prepare: Callable[[str], str]) -> None:
    """Embed exemplars whose vectors another model (or none) made."""
    missing = store.lacking_vectors(embedder.model_id)
    if missing:
        log.info("re-embedding %d exemplars with %s", len(missing), embedder.model_id)
        vectors = embedder.encode([prepare(e.text) for e in missing])
        store.set_embeddings([e.id for e in missing], vectors, embedding_model=embedder.model_id)
