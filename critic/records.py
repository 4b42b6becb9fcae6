"""The data flywheel: every critic judgement recorded durably, and exported for training.

Each record keeps the request id, policy, constitution, the prompt, the draft,
the critique, the revision, the decision, which critic and model answered,
tokens, cost and latency. A policy may ask for texts to be stored as SHA-256
hashes instead (`record_texts: false`); such records still count for usage
but are left out of exports.

Exports are the data of Constitutional AI, from production traffic:
`sft` pairs (prompt, approved response) and `preferences` triples (prompt,
chosen = the critic's revision, rejected = the violating draft).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embeddings_index.database import Database, Row, open_migrated

__all__ = ["CriticRecord", "CriticRecords", "UsageTotals"]

# Applied in order, once each (`Database.migrate`); never edit one that shipped.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS critic_calls (
    id {id},
    created_at DOUBLE PRECISION NOT NULL,
    request_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    constitution TEXT NOT NULL,
    target TEXT NOT NULL,
    mode TEXT NOT NULL,
    texts_stored INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    draft TEXT NOT NULL,
    critique TEXT NOT NULL,
    revision TEXT NOT NULL,
    final_text TEXT NOT NULL,
    decision TEXT NOT NULL,
    violated_rules TEXT NOT NULL,
    critic TEXT NOT NULL,
    model TEXT NOT NULL,
    rounds INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    fail_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS critic_calls_policy ON critic_calls (policy, created_at)
""",
)


@dataclass(frozen=True, slots=True)
class CriticRecord:
    """One judgement of the critic tier (texts as given, hashed on write if asked)."""

    request_id: str
    policy: str
    constitution: str
    target: str  # "prompt" or "response"
    mode: str  # "sync" or "shadow"
    prompt: str
    draft: str
    critique: str
    revision: str
    final_text: str
    decision: str  # "allow", "revise", "block"
    violated_rules: tuple[str, ...]
    critic: str  # "llm" or "local"
    model: str
    rounds: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    fail_reason: str = ""


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Critic usage summed over records."""

    records: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    fail_mode_decisions: int


def _hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest() if text else ""


class CriticRecords:
    """Critic judgements, each committed before `add` returns; thread-safe.

    In a SQLite file by default (`<data_dir>/critic.sqlite3`, WAL,
    synchronous=FULL), or in the fleet's PostgreSQL database.
    """

    def __init__(self, database: Database | Path) -> None:
        """Open the records in `database` (a SQLite file if a path), migrating their table.

        Raises:
            DatabaseError: the database cannot be opened or migrated.
        """
        self.database = open_migrated(database, "critic", _MIGRATIONS)
        self.path = self.database.path

    def close(self) -> None:
        """Close the database (or this store's share of the pool)."""
        self.database.close()

    def add(self, record: CriticRecord, *, store_texts: bool = True) -> None:
        """Write one record durably (texts hashed unless `store_texts`)."""
        keep = (lambda t: t) if store_texts else _hash
        self.database.execute(
            "INSERT INTO critic_calls (created_at, request_id, policy, constitution, target, "
            "mode, texts_stored, prompt, draft, critique, revision, final_text, decision, "
            "violated_rules, critic, model, rounds, calls, prompt_tokens, completion_tokens, "
            "cost_usd, latency_ms, fail_reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(), record.request_id, record.policy, record.constitution,
                record.target, record.mode, int(store_texts), keep(record.prompt),
                keep(record.draft), record.critique, keep(record.revision),
                keep(record.final_text), record.decision, json.dumps(record.violated_rules),
                record.critic, record.model, record.rounds, record.calls,
                record.prompt_tokens, record.completion_tokens, record.cost_usd,
                record.latency_ms, record.fail_reason,
            ),
        )  # fmt: skip

    def _rows(self, where: str) -> Iterator[Row]:
        yield from self.database.query(
            "SELECT prompt, draft, final_text FROM critic_calls "
            f"WHERE texts_stored = 1 AND target = 'response' AND fail_reason = '' AND {where} "
            "ORDER BY id"
        )

    def sft_pairs(self) -> Iterator[dict[str, str]]:
        """(prompt, approved response) pairs: drafts the critic passed and its revisions."""
        for prompt, _draft, final_text in self._rows(
            "decision IN ('allow', 'revise') AND critic = 'llm'"
        ):
            yield {"prompt": prompt, "response": final_text}

    def preference_pairs(self) -> Iterator[dict[str, str]]:
        """(prompt, chosen = revision, rejected = violating draft) triples."""
        for prompt, draft, final_text in self._rows("decision = 'revise' AND critic = 'llm'"):
            yield {"prompt": prompt, "chosen": final_text, "rejected": draft}

    def usage(self, *, policy: str | None = None) -> UsageTotals:
        """Totals over every record (of one policy, if given)."""
        where, params = ("WHERE policy = ?", (policy,)) if policy else ("", ())
        [row] = self.database.query(
            "SELECT COUNT(*), COALESCE(SUM(calls), 0), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_usd), 0), "
            "COALESCE(SUM(CASE WHEN fail_reason <> '' THEN 1 ELSE 0 END), 0) "
            f"FROM critic_calls {where}",
            params,
        )
        return UsageTotals(
            int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]), int(row[5])
        )

    def count(self) -> int:
        """Number of records."""
        return int(self.database.query("SELECT COUNT(*) FROM critic_calls")[0][0])
