"""The exemplar store: the durable source of truth behind the FAISS index.

Its tables live in a `Database`: a SQLite file by default (WAL,
`synchronous=FULL`), or a PostgreSQL database shared by a fleet. A write that
returned is committed, so an acknowledged exemplar survives `kill -9`. Each
exemplar keeps its embedding (and the id of the model that made it), so the
index is rebuilt at start without re-encoding anything.

Every change bumps the index version, one counter in the database: the bump
is the first statement of the change's transaction and holds the counter's row
until commit, so writers in other processes queue behind it and no two
changes ever share a version. On PostgreSQL the same transaction sends
`NOTIFY tierguard_index, '<version>'`, and `changes_since` tells a process
that holds an older version what was added and removed since.

Exemplars are never deleted outright: they carry the version that added them
and the version that removed them, and an event table records every add and
remove, so the exemplar set of any earlier version can be reconstructed and
rolled back to (as a new version).
"""

from __future__ import annotations

import builtins
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embeddings_index.database import Database, Transaction, open_migrated
from embeddings_index.vocabulary import Label

__all__ = [
    "INDEX_CHANNEL",
    "LABELS",
    "Changes",
    "Exemplar",
    "ExemplarStore",
    "StoreError",
    "text_key",
]

LABELS = tuple(Label)
# PostgreSQL NOTIFY channel that carries each new index version.
INDEX_CHANNEL = "tierguard_index"

# Applied in order, once each (`Database.migrate`); never edit one that shipped.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS exemplars (
    row_id {id},
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    text_key TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('risky', 'benign')),
    category TEXT NOT NULL,
    source TEXT NOT NULL,
    lang TEXT NOT NULL DEFAULT '',
    added_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    added_version BIGINT NOT NULL,
    deleted_version BIGINT,
    embedding {blob},
    embedding_model TEXT
);
CREATE INDEX IF NOT EXISTS exemplars_live ON exemplars (deleted_version, label, category);
CREATE INDEX IF NOT EXISTS exemplars_text_key ON exemplars (text_key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exemplar_events (
    version BIGINT NOT NULL,
    row_id BIGINT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('add', 'remove'))
);
CREATE INDEX IF NOT EXISTS exemplar_events_row ON exemplar_events (row_id, version);
CREATE TABLE IF NOT EXISTS proposals (
    id {id},
    text TEXT NOT NULL,
    text_key TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('risky', 'benign')),
    category TEXT NOT NULL,
    source TEXT NOT NULL,
    added_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    decided_by TEXT,
    decided_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX IF NOT EXISTS proposals_pending
    ON proposals (text_key, label) WHERE status = 'pending'
""",
    # 2: the rows of one version (events of an add) and the events since a version
    # (changes_since) without scanning every exemplar.
    """
CREATE INDEX IF NOT EXISTS exemplars_added ON exemplars (added_version);
CREATE INDEX IF NOT EXISTS exemplar_events_version ON exemplar_events (version)
""",
)

_COLUMNS = (
    "row_id, id, text, label, category, source, lang, added_by, reason, created_at, "
    "added_version, deleted_version"
)


class StoreError(RuntimeError):
    """A change the store refuses: a duplicate id, an unknown label, a version it never had.

    A database that cannot be reached or written raises `DatabaseError` instead.
    """


@dataclass(frozen=True, slots=True)
class Exemplar:
    """A known-risky or known-benign text and where it came from."""

    id: str
    text: str
    label: str
    category: str
    source: str
    lang: str = ""
    added_by: str = ""
    reason: str = ""
    created_at: float = 0.0
    row_id: int = 0
    added_version: int = 0
    deleted_version: int | None = None


def text_key(text: str) -> str:
    """Hash of a text with case and whitespace folded: finds exact duplicates."""
    folded = " ".join(text.casefold().split())
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed in the store after one version, up to `version` (see `changes_since`).

    Attributes:
        version: The store's version these changes lead to.
        added: Exemplars live at `version` that were added or restored after the
            earlier one (a holder of the earlier set may already have some).
        vectors: `vectors[i]` is the vector of `added[i]`.
        missing: Exemplars added or restored but without a vector of the model asked for.
        removed: Ids of exemplars removed after the earlier version and not live
            at `version` (a holder of the earlier set may never have had some).
    """

    version: int
    added: list[Exemplar]
    vectors: np.ndarray
    missing: list[Exemplar]
    removed: list[str]


class _Unchanged(Exception):
    """Raised inside a transaction to roll it back (and its version bump) untouched."""

    def __init__(self, version: int) -> None:
        self.version = version


class ExemplarStore:
    """Exemplars in one database; safe to share between threads (and, on PostgreSQL, processes)."""

    def __init__(self, database: Database | Path) -> None:
        """Open the store in `database` (a SQLite file if a path), migrating its tables.

        The store owns `database` and closes it in `close`.

        Raises:
            DatabaseError: the database cannot be opened or migrated.
        """
        # A path: a SQLite file, whose writes (a whole pack) may wait long for another process.
        self.database = open_migrated(database, "exemplars", _MIGRATIONS, timeout_s=30.0)
        self.path = self.database.path

    def close(self) -> None:
        """Close the database (or this store's share of the pool)."""
        self.database.close()

    def _query(self, sql: str, params: Sequence[object] = ()) -> builtins.list[tuple[Any, ...]]:
        return self.database.query(sql, params)

    # -- versions and metadata ------------------------------------------------

    @property
    def version(self) -> int:
        """The current index version; 0 for an empty, never-changed store."""
        value = self.get_meta("index_version")
        return int(value) if value else 0

    def get_meta(self, key: str) -> str | None:
        """A value from the metadata table, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the metadata table."""
        self.database.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @staticmethod
    def _bump_version(tx: Transaction) -> int:
        """The next version, taken first in a change's transaction (its row stays locked)."""
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('index_version', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)"
        )
        row = tx.query_one("SELECT value FROM meta WHERE key = 'index_version'")
        version = int(row[0]) if row else 0
        tx.notify(INDEX_CHANNEL, str(version))  # delivered at commit, not at all on rollback
        return version

    # -- writes ----------------------------------------------------------------

    def add(
        self,
        exemplars: Sequence[Exemplar],
        embeddings: np.ndarray,
        *,
        embedding_model: str,
        skip_existing: bool = False,
    ) -> int:
        """Add exemplars with their embeddings in one transaction; returns the new version.

        Args:
            skip_existing: Leave out exemplars whose id the store already has
                (live or removed) instead of refusing the batch; with nothing
                left to add, the version stays as it is. Two processes bringing
                in the same starter pack at once both succeed this way.

        Raises:
            StoreError: an id already exists (unless `skip_existing`) or a label is unknown.
            DatabaseError: the write failed; nothing was added.
        """
        if len(exemplars) != len(embeddings):
            raise ValueError("one embedding per exemplar is required")
        for exemplar in exemplars:
            if exemplar.label not in LABELS:
                raise StoreError(f"exemplar {exemplar.id!r}: label must be one of {LABELS}")
        ids = [e.id for e in exemplars]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise StoreError(f"cannot add exemplars: id {duplicate!r} appears twice")
        now = time.time()
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        try:
            with self.database.transaction() as tx:
                version = self._bump_version(tx)  # first: concurrent writers wait here
                taken = set(_existing_ids(tx, ids))
                if taken and not skip_existing:
                    duplicate = next(i for i in ids if i in taken)
                    raise StoreError(f"cannot add exemplars: id {duplicate!r} already exists")
                rows = [
                    (
                        e.id, e.text, text_key(e.text), e.label, e.category, e.source, e.lang,
                        e.added_by, e.reason, e.created_at or now, version,
                        vectors[i].tobytes(), embedding_model,
                    )
                    for i, e in enumerate(exemplars)
                    if e.id not in taken
                ]  # fmt: skip
                if not rows:
                    raise _Unchanged(version - 1)
                tx.executemany(
                    "INSERT INTO exemplars (id, text, text_key, label, category, source, lang, "
                    "added_by, reason, created_at, added_version, embedding, embedding_model) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                tx.execute(
                    "INSERT INTO exemplar_events (version, row_id, action) "
                    "SELECT ?, row_id, 'add' FROM exemplars WHERE added_version = ?",
                    (version, version),
                )
        except _Unchanged as unchanged:
            return unchanged.version
        return version

    def delete(self, exemplar_id: str) -> int | None:
        """Remove a live exemplar; returns the new version, or None if it was not live."""
        try:
            with self.database.transaction() as tx:
                version = self._bump_version(tx)
                row = tx.query_one(
                    "SELECT row_id FROM exemplars WHERE id = ? AND deleted_version IS NULL",
                    (exemplar_id,),
                )
                if row is None:
                    raise _Unchanged(version - 1)
                _set_live(tx, version, removed=[row[0]], restored=[])
        except _Unchanged:
            return None
        return version

    def rollback(self, to_version: int) -> tuple[int, int, int]:
        """Make the live set what it was at `to_version`, as a new version.

        Returns:
            (new version, exemplars removed, exemplars restored).

        Raises:
            StoreError: `to_version` is not an earlier version of this store.
        """
        with self.database.transaction() as tx:
            version = self._bump_version(tx)
            current = version - 1
            if not 0 <= to_version < current:
                raise StoreError(f"to_version must be an earlier version, in [0, {current - 1}]")
            then = {
                row_id
                for row_id, action in tx.query(
                    "SELECT row_id, action FROM exemplar_events e WHERE version = ("
                    "  SELECT MAX(version) FROM exemplar_events WHERE row_id = e.row_id "
                    "  AND version <= ?)",
                    (to_version,),
                )
                if action == "add"
            }
            now = {r[0] for r in tx.query(
                "SELECT row_id FROM exemplars WHERE deleted_version IS NULL")}  # fmt: skip
            removed, restored = sorted(now - then), sorted(then - now)
            _set_live(tx, version, removed=removed, restored=restored)
        return version, len(removed), len(restored)

    def review_proposal(self, proposal_id: int, *, accept: bool, reviewer: str) -> Exemplar:
        """Mark a pending proposal accepted or rejected; returns it (the caller adds it).

        Raises:
            StoreError: no pending proposal has this id.
        """
        with self.database.transaction() as tx:
            row = tx.query_one(
                "SELECT text, label, category, source, added_by, reason, created_at "
                "FROM proposals WHERE id = ? AND status = 'pending'",
                (proposal_id,),
            )
            if row is None:
                raise StoreError(f"no pending proposal {proposal_id}")
            changed = tx.execute(
                "UPDATE proposals SET status = ?, decided_by = ?, decided_at = ? "
                "WHERE id = ? AND status = 'pending'",
                ("accepted" if accept else "rejected", reviewer, time.time(), proposal_id),
            )
            if changed != 1:  # another process reviewed it in between
                raise StoreError(f"no pending proposal {proposal_id}")
        text, label, category, source, added_by, reason, created_at = row
        return Exemplar(id="", text=text, label=label, category=category, source=source,
                        added_by=added_by, reason=reason, created_at=created_at)  # fmt: skip

    def propose(self, exemplar: Exemplar) -> bool:
        """Queue a candidate exemplar for an admin's review; False if already known or queued.

        Proposals never change the index by themselves (auto-learning without
        review is a poisoning vector).
        """
        key = text_key(exemplar.text)
        with self.database.transaction() as tx:
            live = tx.query_one(
                "SELECT 1 FROM exemplars WHERE text_key = ? AND deleted_version IS NULL", (key,)
            )
            if live:
                return False
            inserted = tx.execute(
                "INSERT INTO proposals (text, text_key, label, category, source, "
                "added_by, reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (exemplar.text, key, exemplar.label, exemplar.category, exemplar.source,
                 exemplar.added_by, exemplar.reason, time.time()),
            )  # fmt: skip
            return inserted == 1

    def pending_proposals(
        self, *, after_id: int = 0, limit: int | None = None
    ) -> builtins.list[tuple[int, Exemplar]]:
        """Proposals waiting for review, oldest first, as (proposal id, exemplar).

        Page with `after_id` (the last id of the previous page): keyset paging
        never repeats a proposal or skips one still pending, even when others
        are reviewed in between. `limit=None` returns every pending proposal.
        """
        sql = (
            "SELECT id, text, label, category, source, added_by, reason, created_at "
            "FROM proposals WHERE status = 'pending' AND id > ? ORDER BY id"
        )
        params: builtins.list[object] = [after_id]
        if limit is not None:
            sql, params = sql + " LIMIT ?", [*params, limit]
        rows = self._query(sql, params)
        return [
            (pid, Exemplar(id="", text=text, label=label, category=category, source=source,
                           added_by=added_by, reason=reason, created_at=created_at))
            for pid, text, label, category, source, added_by, reason, created_at in rows
        ]  # fmt: skip

    def count_pending_proposals(self) -> int:
        """Number of proposals waiting for review, counted without loading them."""
        return int(self._query("SELECT COUNT(*) FROM proposals WHERE status = 'pending'")[0][0])

    # -- reads -----------------------------------------------------------------

    def count(self) -> int:
        """Number of live exemplars."""
        return int(
            self._query("SELECT COUNT(*) FROM exemplars WHERE deleted_version IS NULL")[0][0]
        )

    def get(self, exemplar_id: str) -> Exemplar | None:
        """A live exemplar by id, or None."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM exemplars WHERE id = ? AND deleted_version IS NULL",
            (exemplar_id,),
        )
        return _exemplar(rows[0]) if rows else None

    def get_many(self, exemplar_ids: Iterable[str]) -> dict[str, Exemplar]:
        """Live exemplars by id; ids that are not live are left out."""
        ids = builtins.list(dict.fromkeys(exemplar_ids))
        found: dict[str, Exemplar] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM exemplars WHERE deleted_version IS NULL AND id IN "
            for row in self._query(f"{sql}({marks})", chunk):
                exemplar = _exemplar(row)
                found[exemplar.id] = exemplar
        return found

    def find_by_text(self, texts: Iterable[str]) -> dict[str, Exemplar]:
        """Live exemplars whose text equals one of `texts` (case and spacing folded), by key."""
        keys = builtins.list(dict.fromkeys(text_key(t) for t in texts))
        found: dict[str, Exemplar] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                f"SELECT {_COLUMNS}, text_key FROM exemplars "
                f"WHERE deleted_version IS NULL AND text_key IN ({marks})",
                chunk,
            ):
                found[row[-1]] = _exemplar(row[:-1])
        return found

    def live_vectors(
        self, embedding_model: str
    ) -> tuple[builtins.list[Exemplar], np.ndarray, builtins.list[Exemplar]]:
        """Live exemplars with their vectors, plus those that lack a vector of `embedding_model`.

        Returns:
            (exemplars, vectors, missing): `vectors[i]` belongs to `exemplars[i]`;
            `missing` must be re-embedded (another model made their vectors).
        """
        _, exemplars, vectors, missing = self.live_state(embedding_model)
        return exemplars, vectors, missing

    def live_state(
        self, embedding_model: str
    ) -> tuple[int, builtins.list[Exemplar], np.ndarray, builtins.list[Exemplar]]:
        """The version and the live exemplars at that version, read at one moment.

        What an index is built from: with other processes writing, a version
        read apart from the rows could name a set it does not hold.

        Returns:
            (version, exemplars, vectors, missing), as `live_vectors`.
        """
        with self.database.transaction(snapshot=True) as tx:
            row = tx.query_one("SELECT value FROM meta WHERE key = 'index_version'")
            rows = tx.query(
                f"SELECT {_COLUMNS}, embedding, embedding_model FROM exemplars "
                "WHERE deleted_version IS NULL ORDER BY row_id"
            )
        return (int(row[0]) if row else 0, *_with_vectors(rows, embedding_model))

    def changes_since(self, version: int, embedding_model: str) -> Changes:
        """What was added and removed after `version`, up to the current version.

        A process whose index holds the exemplar set of `version` applies these
        (removed ids out, added exemplars in) to hold the current set, without
        reading every vector again.

        Raises:
            StoreError: `version` is newer than the store's (another database's).
        """
        # One snapshot: versions commit in order (each holds the counter's row until
        # commit), so every event up to `current` is in it; later ones wait for the next call.
        with self.database.transaction(snapshot=True) as tx:
            row = tx.query_one("SELECT value FROM meta WHERE key = 'index_version'")
            current = int(row[0]) if row else 0
            if not 0 <= version <= current:
                raise StoreError(f"version {version} is not one of this store's, [0, {current}]")
            rows = tx.query(
                f"SELECT {_E_COLUMNS}, e.embedding, e.embedding_model, ev.action "
                "FROM exemplar_events ev JOIN exemplars e ON e.row_id = ev.row_id "
                "WHERE ev.version > ? AND ev.version <= ? AND ev.version = ("
                "  SELECT MAX(version) FROM exemplar_events "
                "  WHERE row_id = ev.row_id AND version <= ?) "
                "ORDER BY ev.version, e.row_id",
                (version, current, current),
            )
        removed = [row[1] for row in rows if row[-1] == "remove"]
        added, vectors, missing = _with_vectors(
            [row[:-1] for row in rows if row[-1] == "add"], embedding_model
        )
        return Changes(current, added, vectors, missing, removed)

    def lacking_vectors(self, embedding_model: str) -> builtins.list[Exemplar]:
        """Live exemplars without a vector of `embedding_model` (the `missing` of `live_vectors`).

        Reads no vectors, so a start-up that loads an index snapshot stays cheap.
        """
        rows = self._query(
            f"SELECT {_COLUMNS} FROM exemplars WHERE deleted_version IS NULL "
            "AND (embedding IS NULL OR embedding_model IS NULL OR embedding_model <> ?) "
            "ORDER BY row_id",
            (embedding_model,),
        )
        return [_exemplar(row) for row in rows]

    def set_embeddings(
        self, exemplar_ids: Sequence[str], embeddings: np.ndarray, *, embedding_model: str
    ) -> None:
        """Store re-computed vectors (after a model change); does not change the version."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self.database.transaction() as tx:
            tx.executemany(
                "UPDATE exemplars SET embedding = ?, embedding_model = ? WHERE id = ?",
                [
                    (vectors[i].tobytes(), embedding_model, eid)
                    for i, eid in enumerate(exemplar_ids)
                ],
            )

    def list(
        self,
        *,
        label: str | None = None,
        category: str | None = None,
        source: str | None = None,
        after_row_id: int = 0,
        limit: int = 100,
    ) -> builtins.list[Exemplar]:
        """Live exemplars in insertion order, filtered; page with `after_row_id`."""
        clauses = ["deleted_version IS NULL", "row_id > ?"]
        params: builtins.list[object] = [after_row_id]
        for column, value in (("label", label), ("category", category), ("source", source)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        rows = self._query(
            f"SELECT {_COLUMNS} FROM exemplars WHERE {' AND '.join(clauses)} "
            "ORDER BY row_id LIMIT ?",
            [*params, limit],
        )
        return [_exemplar(row) for row in rows]

    def list_all(self, *, source: str | None = None) -> builtins.list[Exemplar]:
        """Every live exemplar (of one source, if given)."""
        exemplars: builtins.list[Exemplar] = []
        while page := self.list(
            source=source, after_row_id=exemplars[-1].row_id if exemplars else 0, limit=1000
        ):
            exemplars.extend(page)
        return exemplars

    def known_ids(self) -> set[str]:
        """Every id the store has ever held, live or removed."""
        return {row[0] for row in self._query("SELECT id FROM exemplars")}

    def counts(self) -> dict[tuple[str, str], int]:
        """Live exemplars by (label, category)."""
        rows = self._query(
            "SELECT label, category, COUNT(*) FROM exemplars WHERE deleted_version IS NULL "
            "GROUP BY label, category"
        )
        return {(label, category): int(n) for label, category, n in rows}


_E_COLUMNS = ", ".join(f"e.{column.strip()}" for column in _COLUMNS.split(","))


def _with_vectors(
    rows: Sequence[tuple[Any, ...]], embedding_model: str
) -> tuple[list[Exemplar], np.ndarray, list[Exemplar]]:
    """Rows of `_COLUMNS, embedding, embedding_model` split into (have, vectors, missing)."""
    have, vectors, missing = [], [], []
    for row in rows:
        exemplar = _exemplar(row[:-2])
        if row[-1] == embedding_model and row[-2] is not None:
            have.append(exemplar)
            vectors.append(np.frombuffer(row[-2], dtype=np.float32))
        else:
            missing.append(exemplar)
    matrix = np.vstack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return have, matrix, missing


def _set_live(
    tx: Transaction, version: int, *, removed: Sequence[int], restored: Sequence[int]
) -> None:
    """Remove and restore rows at `version`, recording the events."""
    tx.executemany(
        "UPDATE exemplars SET deleted_version = ? WHERE row_id = ?", [(version, r) for r in removed]
    )
    tx.executemany(
        "UPDATE exemplars SET deleted_version = NULL WHERE row_id = ?", [(r,) for r in restored]
    )
    tx.executemany(
        "INSERT INTO exemplar_events (version, row_id, action) VALUES (?, ?, ?)",
        [(version, r, "remove") for r in removed] + [(version, r, "add") for r in restored],
    )


def _existing_ids(tx: Transaction, ids: Sequence[str]) -> list[str]:
    found: list[str] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found += [
            row[0] for row in tx.query(f"SELECT id FROM exemplars WHERE id IN ({marks})", chunk)
        ]
    return found


def _exemplar(row: tuple[Any, ...]) -> Exemplar:
    (row_id, eid, text, label, category, source, lang, added_by, reason, created_at,
     added_version, deleted_version) = row  # fmt: skip
    return Exemplar(
        id=eid,
        text=text,
        label=label,
        category=category,
        source=source,
        lang=lang,
        added_by=added_by,
        reason=reason,
        created_at=created_at,
        row_id=row_id,
        added_version=added_version,
        deleted_version=deleted_version,
    )
