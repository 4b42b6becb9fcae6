"""Credentials, the policy registry, the admin state and the decision log, on their own."""

from __future__ import annotations

import time

import pytest

from embeddings_index.database import Storage
from embeddings_index.vocabulary import FailMode
from gateway.runtime.admin_state import AdminState
from gateway.runtime.auth import Credentials, Role, bearer_token
from gateway.runtime.config import Config, ConfigError, Policy, Tenant
from gateway.runtime.decision_log import DecisionLog, LoggedDecision
from gateway.runtime.policies import PolicyRegistry

TOKEN = "t" * 20
KEY = "k" * 20


def config(**changes: object) -> Config:
    values: dict[str, object] = {
        "policies": {"default": Policy(), "strict": Policy(name="strict", escalate_at=0.3)},
        "admin_tokens": {"alice": TOKEN},
        "tenants": {"acme": Tenant("acme", (KEY,), "strict", ("strict",))},
    }
    values.update(changes)
    return Config(**values)  # type: ignore[arg-type]


def test_credentials_identify_admins_tenants_and_strangers() -> None:
    credentials = Credentials(config())
    admin = credentials.identify(TOKEN)
    tenant = credentials.identify(KEY)
    assert admin is not None and admin.role is Role.ADMIN and admin.name == "alice"
    assert tenant is not None and tenant.role is Role.TENANT and tenant.policy == "strict"
    assert (
        credentials.identify(None) is not None and credentials.identify(None).role is Role.ANONYMOUS
    )  # type: ignore[union-attr]
    assert credentials.identify(TOKEN[:-1] + "x") is None
    assert bearer_token({"authorization": f"Bearer {TOKEN}"}) == TOKEN
    assert bearer_token({"authorization": f"Basic {TOKEN}"}) is None
    assert bearer_token({}) is None


def test_tenants_must_name_known_policies() -> None:
    with pytest.raises(ConfigError, match=r"tenants\.acme"):
        config(tenants={"acme": Tenant("acme", (KEY,), "missing")})


def test_registry_updates_are_durable_and_win_over_the_file(storage: Storage) -> None:
    state = AdminState(storage.open("admin"))
    registry = PolicyRegistry(config(), state, {"general", "payflow"})
    before, after = registry.update("strict", {"escalate_at": 0.45, "fail_mode": "open"}, "alice")
    assert before is not None and before.escalate_at == 0.3
    assert after.escalate_at == 0.45 and after.fail_mode is FailMode.OPEN
    assert registry.origin("strict") == "admin" and registry.origin("default") == "config"
    with pytest.raises(ConfigError, match=r"policies\.strict\.escalate_at"):
        registry.update("strict", {"escalate_at": 7}, "alice")
    with pytest.raises(ConfigError, match="constitution"):
        registry.update("strict", {"constitution": "martian"}, "alice")
    state.close()
    reopened_state = AdminState(storage.open("admin"))
    reopened = PolicyRegistry(config(), reopened_state, {"general", "payflow"})
    assert reopened.get("strict").escalate_at == 0.45  # type: ignore[union-attr]
    created = reopened.update("new", {"block_at": 0.9}, "alice")[1]
    assert created.name == "new" and created.escalate_at == Policy().escalate_at
    reopened.update("new", {"block_at": 0.95}, "bob")  # a second change of one policy
    assert reopened_state.policy_overrides()["new"]["block_at"] == 0.95
    reopened_state.close()


def test_audit_pages_newest_first(storage: Storage) -> None:
    state = AdminState(storage.open("admin"))
    for i in range(5):
        state.audit("alice", "act", f"t{i}", {"i": i}, None)
    first = state.audit_events(limit=2)
    older = state.audit_events(limit=2, before_id=first[-1].event_id)
    assert [e.target for e in first + older] == ["t4", "t3", "t2", "t1"]
    assert first[0].before == '{"i": 4}' and first[0].after == ""
    state.close()


def test_idempotency_remembers_replies(storage: Storage) -> None:
    state = AdminState(storage.open("admin"))
    assert state.remembered("M", "r1") is None
    state.remember("M", "r1", b"reply")
    state.remember("M", "r1", b"other")  # the first answer stands
    assert state.remembered("M", "r1") == b"reply"
    assert state.remembered("N", "r1") is None and state.remembered("M", "") is None
    state.close()


def test_decision_log_keeps_texts_only_when_asked(storage: Storage) -> None:
    log = DecisionLog(storage.open("decisions", durable=False), flush_ms=10)
    for keep in (True, False):
        log.append(LoggedDecision("r", "check_prompt", "p", "allow", "embedding", "allow", 0.2, "",
                                  3, f"text kept={keep}", keep))  # fmt: skip
    log.flush()
    assert log.recent_scores("p", 10) == [("allow", 0.2), ("allow", 0.2)]
    texts = [row[0] for row in log.database.query("SELECT text FROM decisions ORDER BY id")]
    assert texts == ["text kept=True", None]
    path = log.path
    log.close()
    if path is not None:  # SQLite: the unkept text is in no byte of the files either
        raw = b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))
        assert b"text kept=True" in raw and b"text kept=False" not in raw


def decision(policy: str, tier: str, verdict: str, *, escalated: bool = False,
             fallback: str = "") -> LoggedDecision:  # fmt: skip
    return LoggedDecision("r", "check_prompt", policy, verdict, tier, "allow", 0.3, fallback, 1,
                          "a text", False, escalated=escalated)  # fmt: skip


def test_traffic_counts_every_writer_of_the_store_over_the_last_hour(storage: Storage) -> None:
    """Two gateways (two logs on one store) are counted together, as GetStats shows them."""
    first = DecisionLog(storage.open("decisions", durable=False), flush_ms=10)
    second = DecisionLog(storage.open("decisions", durable=False), flush_ms=10)
    first.append(decision("p", "embedding", "allow"))
    first.append(decision("p", "critic", "block", escalated=True))
    second.append(decision("p", "critic", "allow", escalated=True, fallback="timeout"))
    second.append(decision("p", "embedding", "allow"))
    second.append(decision("q", "prefilter", "block"))
    first.flush()
    second.flush()
    minute = int(time.time() // 60)
    first.database.execute(  # two hours ago: outside the window
        "INSERT INTO decision_counts VALUES (?, 'p', 'critic', 'block', 50, 50, 0)",
        (minute - 120,),
    )
    for log in (first, second):
        traffic = log.traffic()
        assert traffic.keys() == {"p", "q"}
        p = traffic["p"]
        assert (p.requests, p.escalated, p.fallbacks) == (4, 2, 1)
        assert p.escalation_rate == 0.5
        assert p.decisions == {"embedding/allow": 2, "critic/block": 1, "critic/allow": 1}
        assert traffic["q"].decisions == {"prefilter/block": 1}
    rows = first.database.query("SELECT COUNT(*) FROM decisions")
    assert rows == [(5,)]  # the log lines and the counts come from the same batches
    first.close()
    second.close()


def test_the_decision_log_deletes_what_is_past_its_retention(storage: Storage) -> None:
    log = DecisionLog(storage.open("decisions", durable=False), flush_ms=10, retention_days=7)
    log.append(decision("p", "embedding", "allow"))
    log.flush()
    day = 86_400.0
    now = time.time()
    old = ("old", "check_prompt", "p", "allow", "embedding", "allow", 0.1, "", 1, "h", None)
    for age_days in (8, 30):  # past the retention
        log.database.execute("INSERT INTO decisions (time, request_id, rpc, policy, decision, "
                             "tier, route, risk_score, fallback_reason, index_version, "
                             "text_sha256, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (now - age_days * day, *old))  # fmt: skip
        log.database.execute(
            "INSERT INTO decision_counts VALUES (?, 'p', 'embedding', 'allow', 9, 0, 0)",
            (int((now - age_days * day) // 60),),
        )
    assert log.prune(now=now) == 2
    assert log.database.query("SELECT request_id FROM decisions") == [("r",)]  # today's stays
    assert log.database.query("SELECT SUM(requests) FROM decision_counts") == [(1,)]
    assert log.prune(now=now + 8 * day) == 1  # a week later, today's line goes too
    log.close()
    keep_all = DecisionLog(storage.open("decisions", durable=False), flush_ms=10)
    assert keep_all.prune(now=now + 365 * day) == 0  # retention 0: nothing is ever deleted
    keep_all.close()


def test_the_writer_prunes_as_it_writes(storage: Storage) -> None:
    database = storage.open("decisions", durable=False)
    first = DecisionLog(database, flush_ms=10)
    first.database.execute(
        "INSERT INTO decisions (time, request_id, rpc, policy, decision, tier, route, risk_score, "
        "fallback_reason, index_version, text_sha256, text) "
        "VALUES (?, 'ancient', 'check_prompt', 'p', 'allow', 'embedding', 'allow', 0.1, '', 1, "
        "'h', NULL)",
        (time.time() - 400 * 86_400.0,),
    )
    first.close()
    log = DecisionLog(storage.open("decisions", durable=False), flush_ms=10, retention_days=30)
    log.append(decision("p", "embedding", "allow"))
    log.flush()  # the first write prunes
    assert log.database.query("SELECT request_id FROM decisions") == [("r",)]
    log.close()
