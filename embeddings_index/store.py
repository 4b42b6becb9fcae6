"""The exemplar store: the durable source of truth behind the FAISS index.

SQLite in WAL mode with `synchronous=FULL`: a write that returned has reached
the disk, so an acknowledged exemplar survives `kill -9`. Each exemplar keeps
its embedding (and the id of the model that made it), so the index is rebuilt
at start without re-encoding anything.

Every change bumps the index version. Exemplars are never deleted outright:
they carry the version that added them and the version that removed them, and
an event table records every add and remove, so the exemplar set of any
earlier version can be reconstructed and rolled back to (as a new version).
"""

from __future__ import annotations

import builtins
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embeddings_index.sqlite_db import open_sqlite
from embeddings_index.vocabulary import Label

__all__ = ["LABELS", "Exemplar", "ExemplarStore", "StoreError", "text_key"]

LABELS = tuple(Label)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exemplars (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    text_key TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('risky', 'benign')),
    category TEXT NOT NULL,
    source TEXT NOT NULL,
    lang TEXT NOT NULL DEFAULT '',
    added_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    added_version INTEGER NOT NULL,
    deleted_version INTEGER,
    embedding BLOB,
    embedding_model TEXT
);
CREATE INDEX IF NOT EXISTS exemplars_live ON exemplars (deleted_version, label, category);
CREATE INDEX IF NOT EXISTS exemplars_text_key ON exemplars (text_key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exemplar_events (
    version INTEGER NOT NULL,
    row_id INTEGER NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('add', 'remove'))
);
CREATE INDEX IF NOT EXISTS exemplar_events_row ON exemplar_events (row_id, version);
CREATE TABLE IF NOT EXISTS proposals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    text_key TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('risky', 'benign')),
    category TEXT NOT NULL,
    source TEXT NOT NULL,
    added_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    decided_by TEXT,
    decided_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS proposals_pending
    ON proposals (text_key, label) WHERE status = 'pending';
"""

_COLUMNS = (
    "row_id, id, text, label, category, source, lang, added_by, reason, created_at, "
    "added_version, deleted_version"
)


class StoreError(RuntimeError):
    """The exemplar store could not be read or written."""


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


class ExemplarStore:
    """Exemplars in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = open_sqlite(self.path, _SCHEMA, timeout_s=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open exemplar store {self.path}: {exc}") from exc
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"exemplar store {self.path}: {exc}") from exc

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"exemplar store {self.path}: {exc}") from exc

    # -- versions and metadata ------------------------------------------------

    @property
    def version(self) -> int:
        """The current index version; 0 for an empty, never-changed store."""
        value = self.get_meta("index_version")
        return int(value) if value else 0

    def get_meta(self, key: str) -> str | None:
        """A value from the metadata table, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the metadata table."""
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @staticmethod
    def _bump_version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'index_version'").fetchone()
        version = (int(row[0]) if row else 0) + 1
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('index_version', ?)", (str(version),)
        )
        return version

    # -- writes ----------------------------------------------------------------

    def add(
        self,
        exemplars: Sequence[Exemplar],
        embeddings: np.ndarray,
        *,
        embedding_model: str,
    ) -> int:
        """Add exemplars with their embeddings in one transaction; returns the new version.

        Raises:
            StoreError: an id already exists, a label is unknown, or the write failed.
        """
        if len(exemplars) != len(embeddings):
            raise ValueError("one embedding per exemplar is required")
        for exemplar in exemplars:
            if exemplar.label not in LABELS:
                raise StoreError(f"exemplar {exemplar.id!r}: label must be one of {LABELS}")
        now = time.time()
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = [e.id for e in exemplars]
        with self._transaction() as conn:
            taken = _existing_ids(conn, ids)
            if taken or len(set(ids)) != len(ids):
                duplicate = taken[0] if taken else next(i for i in ids if ids.count(i) > 1)
                raise StoreError(f"cannot add exemplars: id {duplicate!r} already exists")
            version = self._bump_version(conn)
            conn.executemany(
                "INSERT INTO exemplars (id, text, text_key, label, category, source, lang, "
                "added_by, reason, created_at, added_version, embedding, embedding_model) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.id, e.text, text_key(e.text), e.label, e.category, e.source, e.lang,
                        e.added_by, e.reason, e.created_at or now, version,
                        vectors[i].tobytes(), embedding_model,
                    )
                    for i, e in enumerate(exemplars)
                ],
            )  # fmt: skip
            conn.execute(
                "INSERT INTO exemplar_events (version, row_id, action) "
                "SELECT ?, row_id, 'add' FROM exemplars WHERE added_version = ?",
                (version, version),
            )
        return version

    def delete(self, exemplar_id: str) -> int | None:
        """Remove a live exemplar; returns the new version, or None if it was not live."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT row_id FROM exemplars WHERE id = ? AND deleted_version IS NULL",
                (exemplar_id,),
            ).fetchone()
            if row is None:
                return None
            version = self._bump_version(conn)
            _set_live(conn, version, removed=[row[0]], restored=[])
        return version

    def rollback(self, to_version: int) -> tuple[int, int, int]:
        """Make the live set what it was at `to_version`, as a new version.

        Returns:
            (new version, exemplars removed, exemplars restored).

        Raises:
            StoreError: `to_version` is not an earlier version of this store.
        """
        with self._transaction() as conn:
            current = int((conn.execute(
                "SELECT value FROM meta WHERE key = 'index_version'").fetchone() or [0])[0])  # fmt: skip
            if not 0 <= to_version < current:
                raise StoreError(f"to_version must be an earlier version, in [0, {current - 1}]")
            then = {
                row_id
                for row_id, action in conn.execute(
                    "SELECT row_id, action FROM exemplar_events e WHERE version = ("
                    "  SELECT MAX(version) FROM exemplar_events WHERE row_id = e.row_id "
                    "  AND version <= ?)",
                    (to_version,),
                )
                if action == "add"
            }
            now = {r[0] for r in conn.execute(
                "SELECT row_id FROM exemplars WHERE deleted_version IS NULL")}  # fmt: skip
            removed, restored = sorted(now - then), sorted(then - now)
            version = self._bump_version(conn)
            _set_live(conn, version, removed=removed, restored=restored)
        return version, len(removed), len(restored)

    def review_proposal(self, proposal_id: int, *, accept: bool, reviewer: str) -> Exemplar:
        """Mark a pending proposal accepted or rejected; returns it (the caller adds it).

        Raises:
            StoreError: no pending proposal has this id.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT text, label, category, source, added_by, reason, created_at "
                "FROM proposals WHERE id = ? AND status = 'pending'",
                (proposal_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"no pending proposal {proposal_id}")
            conn.execute(
                "UPDATE proposals SET status = ?, decided_by = ?, decided_at = ? WHERE id = ?",
                ("accepted" if accept else "rejected", reviewer, time.time(), proposal_id),
            )
        text, label, category, source, added_by, reason, created_at = row
        return Exemplar(id="", text=text, label=label, category=category, source=source,
                        added_by=added_by, reason=reason, created_at=created_at)  # fmt: skip

    def propose(self, exemplar: Exemplar) -> bool:
        """Queue a candidate exemplar for an admin's review; False if already known or queued.

        Proposals never change the index by themselves (auto-learning without
        review is a poisoning vector).
        """
        key = text_key(exemplar.text)
        with self._transaction() as conn:
            live = conn.execute(
                "SELECT 1 FROM exemplars WHERE text_key = ? AND deleted_version IS NULL", (key,)
            ).fetchone()
            if live:
                return False
            cursor = conn.execute(
                "INSERT OR IGNORE INTO proposals (text, text_key, label, category, source, "
                "added_by, reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (exemplar.text, key, exemplar.label, exemplar.category, exemplar.source,
                 exemplar.added_by, exemplar.reason, time.time()),
            )  # fmt: skip
            return cursor.rowcount == 1

    def pending_proposals(
        self, *, after_id: int = 0, limit: int | None = None
    ) -> list[tuple[int, Exemplar]]:
        """Proposals waiting for review, oldest first, as (proposal id, exemplar).

        Page with `after_id` (the last id of the previous page): keyset paging
        never repeats a proposal or skips one still pending, even when others
        are reviewed in between. `limit=None` returns every pending proposal.
        """
        rows = self._query(
            "SELECT id, text, label, category, source, added_by, reason, created_at "
            "FROM proposals WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?",
            (after_id, -1 if limit is None else limit),
        )
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
        ids = list(dict.fromkeys(exemplar_ids))
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
        keys = list(dict.fromkeys(text_key(t) for t in texts))
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
    ) -> tuple[list[Exemplar], np.ndarray, list[Exemplar]]:
        """Live exemplars with their vectors, plus those that lack a vector of `embedding_model`.

        Returns:
            (exemplars, vectors, missing): `vectors[i]` belongs to `exemplars[i]`;
            `missing` must be re-embedded (another model made their vectors).
        """
        rows = self._query(
            f"SELECT {_COLUMNS}, embedding, embedding_model FROM exemplars "
            "WHERE deleted_version IS NULL ORDER BY row_id"
        )
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

    def lacking_vectors(self, embedding_model: str) -> list[Exemplar]:
        """Live exemplars without a vector of `embedding_model` (the `missing` of `live_vectors`).

        Reads no vectors, so a start-up that loads an index snapshot stays cheap.
        """
        rows = self._query(
            f"SELECT {_COLUMNS} FROM exemplars WHERE deleted_version IS NULL "
            "AND (embedding IS NULL OR embedding_model IS NOT ?) ORDER BY row_id",
            (embedding_model,),
        )
        return [_exemplar(row) for row in rows]

    def set_embeddings(
        self, exemplar_ids: Sequence[str], embeddings: np.ndarray, *, embedding_model: str
    ) -> None:
        """Store re-computed vectors (after a model change); does not change the version."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self._transaction() as conn:
            conn.executemany(
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
    ) -> list[Exemplar]:
        """Live exemplars in insertion order, filtered; page with `after_row_id`."""
        clauses = ["deleted_version IS NULL", "row_id > ?"]
        params: list[object] = [after_row_id]
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


def _set_live(
    conn: sqlite3.Connection, version: int, *, removed: Sequence[int], restored: Sequence[int]
) -> None:
    """Remove and restore rows at `version`, recording the events."""
    conn.executemany(
        "UPDATE exemplars SET deleted_version = ? WHERE row_id = ?", [(version, r) for r in removed]
    )
    conn.executemany(
        "UPDATE exemplars SET deleted_version = NULL WHERE row_id = ?", [(r,) for r in restored]
    )
    conn.executemany(
        "INSERT INTO exemplar_events (version, row_id, action) VALUES (?, ?, ?)",
        [(version, r, "remove") for r in removed] + [(version, r, "add") for r in restored],
    )


def _existing_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    found: list[str] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found += [
            row[0] for row in conn.execute(f"SELECT id FROM exemplars WHERE id IN ({marks})", chunk)
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
