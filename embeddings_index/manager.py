"""Keeps the FAISS index in step with the exemplar store.

`IndexManager.open` is what a server calls at start: open the store, bring the
shipped starter pack in, re-embed anything another model embedded, build the
index. Writes go to the store first (durable), then a new index snapshot is
made aside and swapped in; searches in flight keep the old snapshot.

A change becomes a new snapshot without a rebuild: `ExemplarIndex.with_changes`
keeps additions in a small exact side index and removals in a deletion bitmap,
sharing the built base. Only a change set that would take the side past
`IndexOptions.max_delta`, or a size that calls for another structure (exact
to approximate), rebuilds from the store. `catch_up` applies what other
processes changed in a shared store since the serving index's version
(`ExemplarStore.changes_since`); it is also what a local write falls back to
when another process's change landed in between.
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

__all__ = ["AddOutcome", "CatchUp", "IndexManager"]

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


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What `IndexManager.catch_up` applied.

    Attributes:
        from_version: The serving index's version before.
        version: Its version after (the store's when it read the changes).
        added: Exemplars that came into the index.
        removed: Exemplars that left it.
        rebuilt: True if the index was rebuilt from the store rather than changed on the side.
    """

    from_version: int
    version: int
    added: int
    removed: int
    rebuilt: bool


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
        store: ExemplarStore | None = None,
    ) -> IndexManager:
        """Open (or create) the store under `data_dir` and build (or load) the index.

        Args:
            data_dir: Directory for `exemplars.sqlite3` (unless `store` is given).
            embedder: Embeds exemplars that have no vector of its model yet.
            prepare: Turns an exemplar's text into what the embedder reads; it
                must match what queries go through (tier-0 normalisation).
            starter_dir: The starter pack to keep in step with, or None for none.
            index_options: Exact or approximate structure and its knobs (defaults if None).
            snapshot_dir: Where to save the built index and load it from at the
                next start (`<data_dir>/index` by convention); None: always rebuild.
            store: An open store to use (e.g. on PostgreSQL); the manager owns it.
        """
        if store is None:
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
        # The version and the rows from one snapshot of the store: another process's
        # change committed in between must not be labelled with a version without it.
        version, exemplars, vectors, missing = self.store.live_state(self.embedder.model_id)
        if missing:
            raise RuntimeError(f"{len(missing)} exemplars lack vectors of {self.embedder.model_id}")
        if not len(vectors):
            vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        return ExemplarIndex(
            version=version,
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
            # A store behind the index went back (restored from a backup): follow it.
            self._holder.swap(index, force=True)
            self._save(index)
        return index

    def _fits_on_the_side(self, current: ExemplarIndex, changes: int, size: int) -> bool:
        """Whether `changes` more, leaving `size` live exemplars, go on the side (no rebuild)."""
        return (
            current.changes_since_build + changes <= self.index_options.max_delta
            and self.index_options.structure_for(size) == current.structure
        )

    def _changed(
        self,
        version: int,
        *,
        added: Sequence[Exemplar] = (),
        vectors: np.ndarray | None = None,
        removed: Sequence[str] = (),
    ) -> None:
        """Swap in an index at `version`, the store's state after this process's add or delete.

        When the index is exactly one version behind, the change goes on the side
        (`with_changes`) within `max_delta`; when another process changed the
        store in between, the index catches up from the store (`catch_up`).
        """
        current = self.index
        size = len(current) + len(added) - len(removed)
        changes = len(added) + len(removed)
        if version != current.version + 1 or not self._fits_on_the_side(current, changes, size):
            self._catch_up()
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

    def catch_up(self) -> CatchUp | None:
        """Apply what changed in the store since the serving index's version.

        Other processes sharing the store (replicas on one PostgreSQL database)
        call this when told of a new version. Small change sets go on the side
        of the current index; large ones (past `max_delta`) rebuild it from the
        store. Exemplars stored without a vector of this process's model are
        embedded here.

        Returns:
            What was applied, or None when the index was current.

        Raises:
            DatabaseError: the store cannot be read; the index stays as it was.
        """
        with self._write_lock:
            return self._catch_up()

    def _catch_up(self) -> CatchUp | None:
        current = self.index
        version = self.store.version
        if version == current.version:
            return None
        if version < current.version:
            log.warning(
                "the exemplar store is at version %d, behind this index's %d: rebuilding",
                version,
                current.version,
            )
            index = self.refresh()
            return CatchUp(current.version, index.version, len(index), len(current), True)
        changes = self.store.changes_since(current.version, self.embedder.model_id)
        added, vectors = list(changes.added), changes.vectors
        if changes.missing:  # stored by a process with another model: embed them here
            added += changes.missing
            fresh = self.encode([e.text for e in changes.missing])
            vectors = np.vstack([vectors, fresh]) if len(vectors) else fresh
        # A holder of the older version may have some of these already (removed and
        # restored since), or never had some removed ones (added and removed since).
        live = current.live_among([e.id for e in added] + changes.removed)
        keep = [i for i, e in enumerate(added) if e.id not in live]
        removed = [eid for eid in changes.removed if eid in live]
        size = len(current) + len(keep) - len(removed)
        if not self._fits_on_the_side(current, len(keep) + len(removed), size):
            index = self.refresh()
            return CatchUp(current.version, index.version, len(keep), len(removed), True)
        index = current.with_changes(
            version=changes.version,
            ids=[added[i].id for i in keep],
            labels=[added[i].label for i in keep],
            categories=[added[i].category for i in keep],
            vectors=vectors[keep] if keep else None,
            removed_ids=removed,
        )
        self._holder.swap(index)
        self._save(index)
        return CatchUp(current.version, index.version, len(keep), len(removed), False)

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
            # Duplicates are looked for among what other processes sharing the store
            # added too, even if their change has not reached this index yet.
            self._catch_up()
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
            self._catch_up()  # the difference, on the side unless it is large
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
