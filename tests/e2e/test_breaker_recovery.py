"""Regression (issue 11): the critic's circuit breaker recovers after a half-open trial is cut.

Through the real stack: a gateway on loopback whose LLM critic is the fake
OpenAI-compatible server. The circuit opens on 5xx answers; after the reset
interval the one half-open trial is cut short (by the caller's gRPC deadline,
or by the caller cancelling the RPC while the endpoint is slow); then the
endpoint is healthy again, and escalated prompts must be judged by the critic
again, not answered `circuit_open` (which a fail-open policy turns into ALLOW,
unjudged) until a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.vocabulary import FailMode
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import start_server
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from tests.conftest import llm_config, make_config
from tests.fakes.openai_server import FakeOpenAI, Reply, http_error, slow, verdict

RESET_S = 0.2
POLICY = "critic-all-open"  # every prompt escalated; fail open: the case the issue is about
PROMPT = "What's the difference between a debit and a credit card?"


class Endpoint:
    """The fake LLM's behaviour, switched by the test: down (5xx), slow, or healthy."""

    def __init__(self) -> None:
        self.state = "down"

    def __call__(self, request: dict[str, Any]) -> Reply:
        if self.state == "down":
            return http_error(503)
        if self.state == "slow":
            return slow(1.0)
        return verdict(False, explanation="an ordinary question")


@pytest.fixture
async def stub(
    data_dir: Path, embedder: SentenceTransformerEmbedder, fake_llm: FakeOpenAI
) -> AsyncIterator[pb_grpc.GuardrailServiceStub]:
    """A gateway whose critic opens after 2 failed judgements and half-opens after RESET_S."""
    policies = {
        "default": Policy(name="default"),
        POLICY: Policy(name=POLICY, escalate_at=0.0, block_at=1.0, fail_mode=FailMode.OPEN),
    }
    critic = llm_config(fake_llm, max_retries=0, circuit_failures=2, circuit_reset_s=RESET_S)
    gateway = Gateway.create(make_config(data_dir, policies=policies, critic=critic),
                             embedder=embedder)  # fmt: skip
    running = await start_server(gateway, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.GuardrailServiceStub(channel)
    finally:
        await running.stop(grace_seconds=0)


async def check(stub: pb_grpc.GuardrailServiceStub, **kw: Any) -> pb.Verdict:
    request = pb.CheckPromptRequest(text=PROMPT, policy=POLICY)
    return (await stub.CheckPrompt(request, **kw)).verdict


async def cut_by_the_deadline(stub: pb_grpc.GuardrailServiceStub, fake: FakeOpenAI) -> None:
    """The trial's caller sets a ~100 ms deadline: too short for the critic to call at all.

    The gateway answers 50 ms before the caller's deadline and makes no model
    call with under 50 ms left, so under 100 ms the trial always ends on the
    caller's deadline (an exact 100 ms can leave just enough for a call, whose
    timeout would then count as an endpoint failure: not the case under test).
    """
    try:
        reply = await check(stub, timeout=0.09)
    except grpc.aio.AioRpcError as exc:  # the answer did not make it back in time
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return
    assert reply.fallback_applied and reply.fallback_reason == "deadline"  # the trial was let out


async def cancelled_mid_call(stub: pb_grpc.GuardrailServiceStub, fake: FakeOpenAI) -> None:
    """The trial's call is out to the slow endpoint when the caller cancels the RPC."""
    calls = fake.calls
    call = stub.CheckPrompt(pb.CheckPromptRequest(text=PROMPT, policy=POLICY), timeout=10)
    for _ in range(500):  # until the trial's call reaches the slow endpoint
        if fake.calls > calls:
            break
        await asyncio.sleep(0.01)
    assert fake.calls == calls + 1, "the half-open trial never reached the endpoint"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize("end_trial", [cut_by_the_deadline, cancelled_mid_call])
async def test_the_critic_is_judging_again_once_the_endpoint_recovers(
    stub: pb_grpc.GuardrailServiceStub,
    fake_llm: FakeOpenAI,
    end_trial: Callable[[pb_grpc.GuardrailServiceStub, FakeOpenAI], Awaitable[None]],
) -> None:
    endpoint = Endpoint()
    fake_llm.handle_with(endpoint)
    for _ in range(2):  # two failed judgements open the circuit
        assert (await check(stub)).fallback_reason == "server_error"
    opened = await check(stub)
    assert opened.fallback_reason == "circuit_open"
    assert opened.decision == pb.DECISION_ALLOW  # fail open: unjudged prompts go through

    await asyncio.sleep(RESET_S * 1.5)  # half-open: the next escalation is the one trial
    endpoint.state = "slow"
    await end_trial(stub, fake_llm)

    endpoint.state = "healthy"
    for _ in range(50):  # a cancelled handler may take a moment to unwind on the server
        judged = await check(stub, timeout=10)
        if judged.fallback_reason != "circuit_open":
            break
        await asyncio.sleep(RESET_S / 2)
    assert judged.fallback_reason == "" and not judged.fallback_applied
    assert judged.decided_by == pb.TIER_CRITIC and judged.critic.critic_kind == pb.CRITIC_KIND_LLM
    assert judged.decision == pb.DECISION_ALLOW and judged.critic.calls == 1
