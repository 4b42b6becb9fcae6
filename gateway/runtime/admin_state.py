"""Durable administrative state: the audit log, policy changes, idempotent replies.

Its tables live in a `Database`: `<data_dir>/admin.sqlite3` by default (WAL,
synchronous=FULL), or the fleet's PostgreSQL database. A change an admin was
told succeeded is committed, so it survives `kill -9`. Policies changed
through the admin API are stored here and win over the config file until reset.

A policy change is read, merged and written in one transaction holding a lock
named after the policy (on PostgreSQL an advisory lock every gateway on the
database honours), so two gateways changing one policy at once never drop
each other's field; the same transaction sends `NOTIFY tierguard_policy,
'<name>'` so the other gateways reload it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embeddings_index.database import Database, open_migrated

__all__ = ["POLICY_CHANNEL", "AdminState", "AuditEvent"]

# PostgreSQL NOTIFY channel that carries the name of each policy changed through the admin API.
POLICY_CHANNEL = "tierguard_policy"

_UPSERT_POLICY = (
    "INSERT INTO policy_overrides (name, body, updated_at, updated_by) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET body = excluded.body, "
    "updated_at = excluded.updated_at, updated_by = excluded.updated_by"
)

# Applied in order, once each (`Database.migrate`); never edit one that shipped.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS audit (
    id {id},
    time DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_overrides (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    response {blob} NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (method, request_id)
)
""",
)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One administrative change (before/after as JSON text)."""

    event_id: int
    time: float
    actor: str
    action: str
    target: str
    before: str
    after: str


class AdminState:
    """Audit log, policy overrides and idempotency keys; thread-safe."""

    def __init__(self, database: Database | Path) -> None:
        """Open the state in `database` (a SQLite file if a path), migrating its tables.

        Raises:
            DatabaseError: the database cannot be opened or migrated.
        """
        self.database = open_migrated(database, "admin", _MIGRATIONS)
        self.path = self.database.path

    def close(self) -> None:
        """Close the database (or this store's share of the pool)."""
        self.database.close()

    def audit(
        self, actor: str, action: str, target: str, before: Any = None, after: Any = None
    ) -> None:
        """Append an event; `before` and `after` are stored as JSON."""

        def dump(value: object) -> str:
            return "" if value is None else json.dumps(value, sort_keys=True, default=str)

        self.database.execute(
            "INSERT INTO audit (time, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, dump(before), dump(after)),
        )

    def audit_events(self, *, limit: int, before_id: int | None = None) -> list[AuditEvent]:
        """Events newest first, older than `before_id` when given."""
        rows = self.database.query(
            "SELECT id, time, actor, action, target, before, after FROM audit "
            "WHERE id < ? ORDER BY id DESC LIMIT ?",
            (before_id if before_id is not None else 2**62, limit),
        )
        return [AuditEvent(*row) for row in rows]

    def update_policy_override(
        self,
        name: str,
        merge: Callable[[dict[str, Any] | None], dict[str, Any]],
        actor: str,
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Replace the stored policy `name` by `merge(stored body or None)`, atomically.

        The read, `merge` and the write are one transaction under the policy's
        lock: a concurrent update of the same policy, in this process or another
        on the same database, waits and then merges into this one's result.

        Returns:
            (the stored body before, or None; the body stored now).

        Raises:
            Whatever `merge` raises (nothing is written); DatabaseError.
        """
        with self.database.transaction() as tx:
            tx.lock(f"tierguard_policy:{name}")
            row = tx.query_one("SELECT body FROM policy_overrides WHERE name = ?", (name,))
            before = json.loads(row[0]) if row else None
            after = merge(before)
            tx.execute(
                _UPSERT_POLICY, (name, json.dumps(after, sort_keys=True), time.time(), actor)
            )
            tx.notify(POLICY_CHANNEL, name[:256])  # at commit: the other gateways reload
        return before, after

    def policy_overrides(self) -> dict[str, dict[str, Any]]:
        """Policies changed through the admin API, by name."""
        rows = self.database.query("SELECT name, body FROM policy_overrides")
        return {name: json.loads(body) for name, body in rows}

    def remembered(self, method: str, request_id: str) -> bytes | None:
        """The reply already given to this (method, request_id), if any."""
        if not request_id:
            return None
        rows = self.database.query(
            "SELECT response FROM idempotency WHERE method = ? AND request_id = ?",
            (method, request_id),
        )
        return bytes(rows[0][0]) if rows else None

    def remember(self, method: str, request_id: str, response: bytes) -> None:
        """Keep the reply to (method, request_id) so a retry gets the same answer."""
        if not request_id:
            return
        self.database.execute(
            "INSERT INTO idempotency (request_id, method, response, created_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (request_id, method, response, time.time()),
        )
