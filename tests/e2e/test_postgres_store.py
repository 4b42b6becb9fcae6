"""The real gateway with `store.url` on PostgreSQL: what it acknowledged outlives it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from embeddings_index.embedder import SentenceTransformerEmbedder
from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import start_server
from gateway.runtime.app import Gateway
from gateway.runtime.config import StoreConfig
from tests.e2e.conftest import ADMIN, ATTACK, PARAPHRASE, admin_config


@asynccontextmanager
async def gateway_on(
    url: str, data_dir: Path, embedder: SentenceTransformerEmbedder
) -> AsyncIterator[tuple[apb_grpc.AdminServiceStub, pb_grpc.GuardrailServiceStub]]:
    """A gateway whose store is the database at `url`, stopped (and closed) on leaving."""
    config = admin_config(data_dir, store=StoreConfig(url=url))
    running = await start_server(Gateway.create(config, embedder=embedder), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield apb_grpc.AdminServiceStub(channel), pb_grpc.GuardrailServiceStub(channel)
    finally:
        await running.stop(grace_seconds=0)


async def route(checks: pb_grpc.GuardrailServiceStub, text: str) -> pb.Verdict:
    return (await checks.CheckPrompt(pb.CheckPromptRequest(text=text, policy="demo"))).verdict


async def test_exemplars_and_policies_outlive_the_gateway_in_postgresql(
    pg_url: str, embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    async with gateway_on(pg_url, tmp_path / "first", embedder) as (admin, checks):
        before = await route(checks, PARAPHRASE)
        added = await admin.AddExemplars(
            apb.AddExemplarsRequest(exemplars=[apb.Exemplar(
                text=ATTACK, label=pb.LABEL_RISKY, category="prompt_injection", source="test",
            )]),
            metadata=ADMIN,
        )  # fmt: skip
        exemplar_id = added.results[0].exemplar_id
        after = await route(checks, PARAPHRASE)
        assert after.decision == pb.DECISION_BLOCK or after.escalated
        assert after.index_version == added.index_version > before.index_version
        assert exemplar_id in {m.exemplar_id for m in after.nearest_exemplars}
        await admin.UpdatePolicy(
            apb.UpdatePolicyRequest(
                policy=apb.Policy(name="demo", escalate_at=0.55),
                update_mask=FieldMask(paths=["escalate_at"]),
            ),
            metadata=ADMIN,
        )
    # Another data directory: nothing local survives, only what is in the database.
    async with gateway_on(pg_url, tmp_path / "second", embedder) as (admin, checks):
        again = await route(checks, PARAPHRASE)
        assert again.index_version == added.index_version
        assert exemplar_id in {m.exemplar_id for m in again.nearest_exemplars}
        policy = (await admin.GetPolicy(apb.GetPolicyRequest(name="demo"), metadata=ADMIN)).policy
        assert policy.escalate_at == 0.55 and policy.policy_origin == apb.POLICY_ORIGIN_ADMIN
        assert again.thresholds.escalate_at == 0.55
    assert not (tmp_path / "second" / "exemplars.sqlite3").exists()
    with psycopg.connect(pg_url) as conn:
        [(text,)] = conn.execute("SELECT text FROM exemplars WHERE id = %s", (exemplar_id,))
        actions = [row[0] for row in conn.execute("SELECT action FROM audit ORDER BY id")]
        logged = conn.execute("SELECT COUNT(*) FROM decisions").fetchone()
    assert text == ATTACK
    assert actions == ["add_exemplars", "update_policy"]
    assert logged is not None and logged[0] >= 3  # the decision log is there too


async def test_a_store_gone_away_fails_admin_calls_unavailable_and_checks_go_on(
    pg_url: str, embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    schema = pg_url.rsplit("%3D", 1)[1]
    request = pb.CheckPromptRequest(text=PARAPHRASE, policy="transparent")  # shows texts
    async with gateway_on(pg_url, tmp_path / "data", embedder) as (admin, checks):
        assert all(m.text for m in (await checks.CheckPrompt(request)).verdict.nearest_exemplars)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"ALTER SCHEMA {schema} RENAME TO {schema}_away")  # every table gone
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.ListExemplars(apb.ListExemplarsRequest(), metadata=ADMIN)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the store is unavailable" in (caught.value.details() or "")
            reply = await checks.CheckPrompt(request)
            assert reply.verdict.nearest_exemplars  # from the index in memory ...
            assert {m.text for m in reply.verdict.nearest_exemplars} == {""}  # ... texts not
        finally:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f"ALTER SCHEMA {schema}_away RENAME TO {schema}")
        listed = await admin.ListExemplars(apb.ListExemplarsRequest(page_size=1), metadata=ADMIN)
        assert len(listed.exemplars) == 1  # back as soon as the database is


async def test_a_verdict_waiting_for_exemplar_texts_does_not_stall_other_callers(
    pg_url: str, embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    """Regression: the texts of exposed evidence were read on the event loop, so a
    store that answered slowly (here: a table locked by another session for 3 s)
    stopped every call of the gateway, not only the one that showed evidence."""
    shown = pb.CheckPromptRequest(text=PARAPHRASE, policy="transparent")
    plain = pb.CheckPromptRequest(text="What time zone is Denver in?")
    locked = threading.Event()

    def hold_the_lock() -> None:
        with psycopg.connect(pg_url) as conn:
            conn.execute("LOCK TABLE exemplars IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(3.0)
            conn.rollback()

    async with gateway_on(pg_url, tmp_path / "data", embedder) as (_, checks):
        await checks.CheckPrompt(plain)  # warm
        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        await asyncio.to_thread(locked.wait, 10)
        started = time.perf_counter()
        waiting = asyncio.ensure_future(checks.CheckPrompt(shown, timeout=60))
        await asyncio.sleep(0.3)  # it reaches the store and waits for the lock
        reply = await checks.CheckPrompt(plain, timeout=10)
        assert reply.verdict.decision == pb.DECISION_ALLOW
        assert not waiting.done()  # answered while the other still waits ...
        assert time.perf_counter() - started < 2.0  # ... not after the lock went
        assert all(m.text for m in (await waiting).verdict.nearest_exemplars)
        await asyncio.to_thread(holder.join)
