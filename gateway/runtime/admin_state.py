"""Durable administrative state: the audit log, policy changes, idempotent replies.

One SQLite file (`<data_dir>/admin.sqlite3`, WAL, synchronous=FULL): a change
an admin was told succeeded survives `kill -9`. Policies changed through the
admin API are stored here and win over the config file until reset.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embeddings_index.sqlite_db import open_sqlite

__all__ = ["AdminState", "AuditEvent"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_overrides (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    response BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (method, request_id)
);
"""


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

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = open_sqlite(self.path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def audit(
        self, actor: str, action: str, target: str, before: Any = None, after: Any = None
    ) -> None:
        """Append an event; `before` and `after` are stored as JSON."""

        def dump(value: object) -> str:
            return "" if value is None else json.dumps(value, sort_keys=True, default=str)

        with self._lock:
            self._conn.execute(
                "INSERT INTO audit (time, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), actor, action, target, dump(before), dump(after)),
            )

    def audit_events(self, *, limit: int, before_id: int | None = None) -> list[AuditEvent]:
        """Events newest first, older than `before_id` when given."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, time, actor, action, target, before, after FROM audit "
                "WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before_id if before_id is not None else 2**62, limit),
            ).fetchall()
        return [AuditEvent(*row) for row in rows]

    def set_policy_override(self, name: str, body: dict[str, Any], actor: str) -> None:
        """Store a policy as changed through the admin API."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO policy_overrides (name, body, updated_at, updated_by) "
                "VALUES (?, ?, ?, ?)",
                (name, json.dumps(body, sort_keys=True), time.time(), actor),
            )

    def policy_overrides(self) -> dict[str, dict[str, Any]]:
        """Policies changed through the admin API, by name."""
        with self._lock:
            rows = self._conn.execute("SELECT name, body FROM policy_overrides").fetchall()
        return {name: json.loads(body) for name, body in rows}

    def remembered(self, method: str, request_id: str) -> bytes | None:
        """The reply already given to this (method, request_id), if any."""
        if not request_id:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT response FROM idempotency WHERE method = ? AND request_id = ?",
                (method, request_id),
            ).fetchone()
        return bytes(row[0]) if row else None

    def remember(self, method: str, request_id: str, response: bytes) -> None:
        """Keep the reply to (method, request_id) so a retry gets the same answer."""
        if not request_id:
            return
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO idempotency (request_id, method, response, created_at) "
                "VALUES (?, ?, ?, ?)",
                (request_id, method, response, time.time()),
            )
