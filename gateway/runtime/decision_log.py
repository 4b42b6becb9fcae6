"""The decision log: every verdict with its scores, for replay and escalation budgets.

Writes are batched off the event loop (a queue flushed by one thread every
`flush_ms` or `batch` rows), so logging costs a check microseconds, not an
fsync. The price: a crash may lose the last fraction of a second of log
lines; verdicts already sent are not affected. Texts are stored only when the
policy records texts; otherwise a SHA-256 hash identifies repeats.

Its table lives in a `Database`: `<data_dir>/decisions.sqlite3` by default, or
the fleet's PostgreSQL database (opened not durable: synchronous_commit off
for these batches, as SQLite's synchronous=NORMAL).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from embeddings_index.database import Database, DatabaseError, as_database

__all__ = ["DecisionLog", "LoggedDecision"]

log = logging.getLogger(__name__)

# Applied in order, once each (`Database.migrate`); never edit one that shipped.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS decisions (
    id {id},
    time DOUBLE PRECISION NOT NULL,
    request_id TEXT NOT NULL,
    rpc TEXT NOT NULL,
    policy TEXT NOT NULL,
    decision TEXT NOT NULL,
    tier TEXT NOT NULL,
    route TEXT NOT NULL,
    risk_score DOUBLE PRECISION NOT NULL,
    fallback_reason TEXT NOT NULL,
    index_version BIGINT NOT NULL,
    text_sha256 TEXT NOT NULL,
    text TEXT
);
CREATE INDEX IF NOT EXISTS decisions_policy ON decisions (policy, id)
""",
)


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One line of the decision log."""

    request_id: str
    rpc: str
    policy: str
    decision: str
    tier: str
    route: str  # the router's route: allow, escalate, block
    risk_score: float
    fallback_reason: str
    index_version: int
    text: str
    keep_text: bool


class DecisionLog:
    """Appends decisions from any thread; reads recent ones for replay."""

    def __init__(
        self, database: Database | Path, *, flush_ms: float = 200.0, batch: int = 500
    ) -> None:
        """Open the log in `database` (a SQLite file if a path, opened not durable).

        Raises:
            DatabaseError: the database cannot be opened or migrated.
        """
        self.database = as_database(database, durable=False)
        self.path = self.database.path
        try:
            self.database.migrate("decisions", _MIGRATIONS)
        except BaseException:
            self.database.close()
            raise
        self._queue: queue.Queue[LoggedDecision | threading.Event | None] = queue.Queue()
        self._flush_s = flush_ms / 1000.0
        self._batch = batch
        self._writer = threading.Thread(
            target=self._run, name="tierguard-decision-log", daemon=True
        )
        self._writer.start()

    def append(self, decision: LoggedDecision) -> None:
        """Queue a decision for writing (never blocks on the disk)."""
        self._queue.put(decision)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            pending: list[LoggedDecision] = []
            waiters: list[threading.Event] = []
            deadline = time.monotonic() + self._flush_s
            while True:
                if item is None:
                    self._write(pending)
                    for waiter in waiters:
                        waiter.set()
                    return
                if isinstance(item, threading.Event):
                    waiters.append(item)
                    break  # a flush: write now
                pending.append(item)
                remaining = deadline - time.monotonic()
                if len(pending) >= self._batch or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            self._write(pending)
            for waiter in waiters:
                waiter.set()

    def _write(self, decisions: list[LoggedDecision]) -> None:
        if not decisions:
            return
        rows = [
            (
                time.time(), d.request_id, d.rpc, d.policy, d.decision, d.tier, d.route,
                d.risk_score, d.fallback_reason, d.index_version,
                hashlib.sha256(d.text.encode("utf-8")).hexdigest(), d.text if d.keep_text else None,
            )
            for d in decisions
        ]  # fmt: skip
        try:
            with self.database.transaction() as tx:
                tx.executemany(
                    "INSERT INTO decisions (time, request_id, rpc, policy, decision, tier, route, "
                    "risk_score, fallback_reason, index_version, text_sha256, text) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except DatabaseError:
            log.exception("could not write %d decisions to %s", len(rows), self.database.name)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything queued so far is written."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout_s)

    def recent_scores(self, policy: str, limit: int) -> list[tuple[str, float]]:
        """(route, risk score) of the policy's most recent routings, newest first."""
        rows = self.database.query(
            "SELECT route, risk_score FROM decisions WHERE policy = ? ORDER BY id DESC LIMIT ?",
            (policy, limit),
        )
        return [(str(route), float(score)) for route, score in rows]

    def close(self) -> None:
        """Write what is queued, then close."""
        self._queue.put(None)
        self._writer.join(timeout=5)
        self.database.close()
