"""Critic records: durable, hashed on request, exported as training data (SQLite and PostgreSQL)."""

from __future__ import annotations

from critic.records import CriticRecord, CriticRecords
from embeddings_index.database import Storage


def record(
    decision: str, *, critic: str = "llm", fail_reason: str = "", draft: str = "d"
) -> CriticRecord:
    return CriticRecord(
        request_id="r", policy="p", constitution="c@1", target="response", mode="sync",
        prompt="q", draft=draft, critique="why", revision="v" if decision == "revise" else "",
        final_text="v" if decision == "revise" else draft, decision=decision,
        violated_rules=("rule",), critic=critic, model="m", rounds=1, calls=2,
        prompt_tokens=10, completion_tokens=5, cost_usd=0.5, latency_ms=3.0,
        fail_reason=fail_reason,
    )  # fmt: skip


def test_exports_and_usage(storage: Storage) -> None:
    records = CriticRecords(storage.open("critic"))
    records.add(record("revise"))
    records.add(record("allow"))
    records.add(record("block"))
    records.add(record("revise", fail_reason="timeout"))  # a fail mode is not approval
    records.add(record("revise", critic="local"))  # a redaction is not a model's revision
    records.add(record("revise"), store_texts=False)
    assert list(records.preference_pairs()) == [{"prompt": "q", "chosen": "v", "rejected": "d"}]
    assert list(records.sft_pairs()) == [{"prompt": "q", "response": "v"},
                                         {"prompt": "q", "response": "d"}]  # fmt: skip
    usage = records.usage()
    assert (usage.records, usage.calls, usage.prompt_tokens) == (6, 12, 60)
    assert usage.fail_mode_decisions == 1 and usage.cost_usd == 3.0
    assert records.usage(policy="other").records == 0
    records.close()
    reopened = CriticRecords(storage.open("critic"))
    assert reopened.count() == 6
    reopened.close()


def test_hashed_records_keep_no_text(storage: Storage) -> None:
    records = CriticRecords(storage.open("critic"))
    records.add(record("revise", draft="my secret draft"), store_texts=False)
    if records.path is not None:  # SQLite: not in any byte of the files
        path = records.path
        raw = path.read_bytes() + path.with_name(path.name + "-wal").read_bytes()
        assert b"my secret draft" not in raw
    [row] = records.database.query("SELECT * FROM critic_calls")
    assert "my secret draft" not in repr(row)
    records.close()
