"""Concurrent UpdatePolicy calls (and SIGHUP reloads among them) lose no acknowledged field.

Issue 11, defect 2: eleven admins each changing one field of one policy at the
same moment used to keep about half of the old values, in memory and in
`admin.sqlite3`, because each update read, merged and wrote without a lock.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from critic.constitution import load_constitutions
from embeddings_index.vocabulary import CriticMode, FailMode
from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway.api.convert import CRITIC_MODES, FAIL_MODES
from gateway.api.server import RunningServer
from gateway.runtime.admin_state import AdminState
from gateway.runtime.policies import PolicyRegistry, policy_to_dict
from tests.e2e.conftest import ADMIN, admin_config

ROUNDS = 10


def round_values(r: int) -> dict[str, Any]:
    """Round r's value of each of the 11 settable fields: valid, and each differs from
    round r-1's (round 0's from the `demo` policy of `admin_config`), so a lost update shows."""
    return {
        "escalate_at": round(0.30 + 0.01 * r, 2),
        "block_at": round(0.80 + 0.01 * r, 2),
        "k": 5 + r,
        "constitution": ("payflow", "general")[r % 2],
        "critic_mode": ("shadow", "off", "sync")[r % 3],
        "fail_mode": ("open", "closed")[r % 2],
        "max_rounds": (3, 1, 2)[r % 3],
        "critic_budget_ms": 1000 + 100 * r,
        "record_texts": r % 2 == 1,
        "expose_evidence": r % 2 == 0,
        "escalation_budget": round(0.05 + 0.01 * r, 2),
    }


def as_proto_value(field: str, value: Any) -> Any:
    if field == "critic_mode":
        return CRITIC_MODES[CriticMode(value)]
    if field == "fail_mode":
        return FAIL_MODES[FailMode(value)]
    return value


def one_field_update(field: str, value: Any) -> apb.UpdatePolicyRequest:
    policy = apb.Policy(name="demo", **{field: as_proto_value(field, value)})
    return apb.UpdatePolicyRequest(policy=policy, update_mask={"paths": [field]})


@pytest.fixture
async def admin(admin_server: RunningServer) -> AsyncIterator[apb_grpc.AdminServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{admin_server.port}") as channel:
        yield apb_grpc.AdminServiceStub(channel)


def lost_fields(seen: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose value is not the one last acknowledged: {field: (seen, wanted)}."""
    return {f: (seen[f], v) for f, v in wanted.items() if seen[f] != v}


async def served(admin: apb_grpc.AdminServiceStub) -> dict[str, Any]:
    """The `demo` policy as GetPolicy returns it, in the plain values of `round_values`."""
    got = (await admin.GetPolicy(apb.GetPolicyRequest(name="demo"), metadata=ADMIN)).policy
    values = {f: getattr(got, f) for f in round_values(0)}
    values["critic_mode"] = {v: k.value for k, v in CRITIC_MODES.items()}[got.critic_mode]
    values["fail_mode"] = {v: k.value for k, v in FAIL_MODES.items()}[got.fail_mode]
    assert got.policy_origin == apb.POLICY_ORIGIN_ADMIN
    return values


def stored(data_dir: Path) -> dict[str, Any]:
    """The `demo` row of admin.sqlite3, read on a connection of its own."""
    state = AdminState(data_dir / "admin.sqlite3")
    try:
        return state.policy_overrides()["demo"]
    finally:
        state.close()


async def run_rounds(admin: apb_grpc.AdminServiceStub, data_dir: Path) -> list[str]:
    """ROUNDS rounds of 11 concurrent one-field updates; returns a description of every
    field that lost its acknowledged value."""
    losses: list[str] = []
    for r in range(ROUNDS):
        wanted = round_values(r)
        calls = [
            admin.UpdatePolicy(one_field_update(f, v), metadata=ADMIN) for f, v in wanted.items()
        ]
        replies = await asyncio.gather(*calls)
        assert all(reply.policy.policy_origin == apb.POLICY_ORIGIN_ADMIN for reply in replies)
        for where, seen in (("GetPolicy", await served(admin)), ("sqlite", stored(data_dir))):
            losses += [f"round {r} {where}: {lost}" for lost in [lost_fields(seen, wanted)] if lost]
    return losses


async def test_concurrent_one_field_updates_lose_nothing(
    admin: apb_grpc.AdminServiceStub, data_dir: Path
) -> None:
    assert await run_rounds(admin, data_dir) == []
    # What a restarted gateway would serve: the file's policies under the stored overrides.
    state = AdminState(data_dir / "admin.sqlite3")
    try:
        registry = PolicyRegistry(admin_config(data_dir), state, load_constitutions())
        restarted = policy_to_dict(registry.get("demo"))  # type: ignore[arg-type]
    finally:
        state.close()
    assert lost_fields(restarted, round_values(ROUNDS - 1)) == {}


async def test_updates_during_config_reloads_lose_nothing(
    admin_server: RunningServer, admin: apb_grpc.AdminServiceStub, data_dir: Path
) -> None:
    """A SIGHUP reload re-reads the stored overrides and publishes them with the file's
    policies; an update stored and published in between used to vanish from memory, and
    the next update of another field then stored the stale value: a durable loss."""
    gateway = admin_server.gateway
    for i in range(300):  # many stored overrides: each reload takes long enough to race
        await asyncio.to_thread(gateway.policies.update, f"extra-{i}", {"k": 1}, "test")
    stop = threading.Event()

    def reload_until_stopped() -> None:
        while not stop.is_set():
            gateway.reload(gateway.config)

    reloader = threading.Thread(target=reload_until_stopped)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely, as on more cores
    last: dict[str, Any] = {}
    losses: list[str] = []
    reloader.start()
    try:
        for i in range(150):
            field, value = [
                ("k", 1 + (i // 3) % 40),
                ("critic_budget_ms", 1000 + i),
                ("escalation_budget", round(0.001 * i, 3)),
            ][i % 3]
            await admin.UpdatePolicy(one_field_update(field, value), metadata=ADMIN)
            last[field] = value
            if lost := lost_fields(stored(data_dir), last):
                losses.append(f"after update {i}, sqlite: {lost}")
    finally:
        stop.set()
        reloader.join()
        sys.setswitchinterval(switch_interval)
    if lost := lost_fields(await served(admin), last):
        losses.append(f"GetPolicy: {lost}")
    assert losses == []
