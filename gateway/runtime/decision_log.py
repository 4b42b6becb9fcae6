"""The decision log: every verdict with its scores, for replay and escalation budgets.

Writes are batched off the event loop (a queue flushed by one thread every
`flush_ms` or `batch` rows), so logging costs a check microseconds, not an
fsync. The price: a crash may lose the last fraction of a second of log
lines; verdicts already sent are not affected. Texts are stored only when the
policy records texts; otherwise a SHA-256 hash identifies repeats.

Its table lives in a `Database`: `<data_dir>/decisions.sqlite3` by default, or
the fleet's PostgreSQL database (opened not durable: synchronous_commit off
for these batches, as SQLite's synchronous=NORMAL).

Traffic figures (GetStats, the escalation rate against a policy's budget)
must count every gateway on a shared store, and stay cheap however much was
logged. So each batch also adds its counts to `decision_counts`, one row per
minute, policy, tier and decision, in the same transaction as the lines
(the counts never disagree with the log). `traffic()` sums the rows of the
last `TRAFFIC_WINDOW_MINUTES` minutes: a range read on the table's primary
key, a few hundred rows whatever the request rate. Concurrent writers (every
gateway and worker) add to the same rows with `INSERT ... ON CONFLICT DO
UPDATE`, in key order, so two batches never wait on each other in a cycle.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from embeddings_index.database import Database, DatabaseError, open_migrated
from gateway.runtime.stats import PolicyCounters

__all__ = ["PRUNE_EVERY_S", "TRAFFIC_WINDOW_MINUTES", "DecisionLog", "LoggedDecision"]

# traffic() counts the current minute and the 59 before it: the last hour, give or
# take the minute in progress (a trailing window, so that a budget breach shows
# while it happens and an old burst stops counting against the policy).
TRAFFIC_WINDOW_MINUTES = 60
# How often the writer deletes what is past the retention, and how many lines at a time.
PRUNE_EVERY_S = 600.0
_PRUNE_BATCH = 10_000

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
    # per-minute counts for traffic(): the primary key leads with the minute, so the
    # window is one range of the key
    """
CREATE TABLE IF NOT EXISTS decision_counts (
    minute BIGINT NOT NULL,
    policy TEXT NOT NULL,
    tier TEXT NOT NULL,
    decision TEXT NOT NULL,
    requests BIGINT NOT NULL,
    escalated BIGINT NOT NULL,
    fallbacks BIGINT NOT NULL,
    PRIMARY KEY (minute, policy, tier, decision)
)
""",
    # retention deletes by time
    "CREATE INDEX IF NOT EXISTS decisions_time ON decisions (time)",
)

_ADD_COUNTS = (
    "INSERT INTO decision_counts (minute, policy, tier, decision, requests, escalated, fallbacks) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (minute, policy, tier, decision) DO UPDATE SET "
    "requests = decision_counts.requests + excluded.requests, "
    "escalated = decision_counts.escalated + excluded.escalated, "
    "fallbacks = decision_counts.fallbacks + excluded.fallbacks"
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
    escalated: bool = False  # the critic tier was called on (not only routed to it)


class DecisionLog:
    """Appends decisions from any thread; reads recent ones for replay."""

    def __init__(
        self,
        database: Database | Path,
        *,
        flush_ms: float = 200.0,
        batch: int = 500,
        retention_days: float = 0.0,
    ) -> None:
        """Open the log in `database` (a SQLite file if a path, opened not durable).

        Args:
            retention_days: Lines and counts older than this are deleted by the
                writer, at most every `PRUNE_EVERY_S` (0: kept forever).

        Raises:
            DatabaseError: the database cannot be opened or migrated.
        """
        self.retention_s = retention_days * 86_400.0
        self._next_prune = 0.0  # the first write prunes
        self.database = open_migrated(database, "decisions", _MIGRATIONS, durable=False)
        self.path = self.database.path
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
            if self.retention_s and time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY_S
                try:
                    self.prune()
                except DatabaseError:
                    log.exception("could not prune the decision log in %s", self.database.name)
            for waiter in waiters:  # a flush returns once what it waited for is done
                waiter.set()

    def prune(self, now: float | None = None) -> int:
        """Delete the lines and per-minute counts older than the retention, in
        batches (no long lock on a big table); returns how many lines went.

        Every gateway on a shared store prunes; deleting what another already
        deleted is harmless.

        Raises:
            DatabaseError: the store cannot be written.
        """
        if not self.retention_s:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_s
        deleted = 0
        while True:
            with self.database.transaction() as tx:
                n = tx.execute(
                    "DELETE FROM decisions WHERE id IN "
                    "(SELECT id FROM decisions WHERE time < ? LIMIT ?)",
                    (cutoff, _PRUNE_BATCH),
                )
            deleted += n
            if n < _PRUNE_BATCH:
                break
        with self.database.transaction() as tx:
            tx.execute("DELETE FROM decision_counts WHERE minute < ?", (int(cutoff // 60),))
        return deleted

    def _write(self, decisions: list[LoggedDecision]) -> None:
        if not decisions:
            return
        now = time.time()
        rows = [
            (
                now, d.request_id, d.rpc, d.policy, d.decision, d.tier, d.route,
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
                tx.executemany(_ADD_COUNTS, _minute_counts(int(now // 60), decisions))
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

    def traffic(self) -> dict[str, PolicyCounters]:
        """Counts per policy of the last `TRAFFIC_WINDOW_MINUTES` minutes, every gateway's.

        On a shared store these are the fleet's figures (each gateway's lines
        arrive within its `flush_ms`); on SQLite, this gateway's.

        Raises:
            DatabaseError: the store cannot be read.
        """
        first = int(time.time() // 60) - TRAFFIC_WINDOW_MINUTES + 1
        rows = self.database.query(
            "SELECT policy, tier, decision, SUM(requests), SUM(escalated), SUM(fallbacks) "
            "FROM decision_counts WHERE minute >= ? GROUP BY policy, tier, decision",
            (first,),
        )
        traffic: dict[str, PolicyCounters] = {}
        for policy, tier, decision, requests, escalated, fallbacks in rows:
            counters = traffic.setdefault(str(policy), PolicyCounters())
            counters.requests += int(requests)
            counters.escalated += int(escalated)
            counters.fallbacks += int(fallbacks)
            counters.decisions[f"{tier}/{decision}"] += int(requests)
        return traffic

    def close(self) -> None:
        """Write what is queued, then close."""
        self._queue.put(None)
        self._writer.join(timeout=5)
        self.database.close()


def _minute_counts(minute: int, decisions: list[LoggedDecision]) -> list[tuple[object, ...]]:
    """`decisions` summed per (policy, tier, decision), as decision_counts rows, in key order."""
    counts: dict[tuple[str, str, str], list[int]] = {}
    for d in decisions:
        row = counts.setdefault((d.policy, d.tier, d.decision), [0, 0, 0])
        row[0] += 1
        row[1] += d.escalated
        row[2] += bool(d.fallback_reason)
    return [(minute, *key, *values) for key, values in sorted(counts.items())]
