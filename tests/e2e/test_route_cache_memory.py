"""The route cache keeps no replaced index snapshot alive.

Issue 11, defect 3: every cached route held the index snapshot it was routed
on (~14 MB at the starter pack's 8k exemplars), so each admin change left one
more snapshot behind until LRU eviction: one change every 2 s took a server from
0.3 to 1.0 GB in five minutes. The cache is now bound to one snapshot and
emptied by the first route that sees a newer one.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.faiss_index import ExemplarIndex
from embeddings_index.store import Exemplar
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import RunningServer, start_server
from gateway.runtime.app import Gateway
from tests.conftest import make_config

CHANGES = 40
_SUBJECTS = ["the lighthouse keeper", "a violin maker", "the night-shift nurse", "a beekeeper",
             "the ferry captain", "a glassblower", "the archivist", "a mountain guide"]  # fmt: skip
_ACTIONS = ["recites the forbidden", "leaks the hidden", "dumps the secret",
            "prints the confidential", "reveals the private"]  # fmt: skip


def new_exemplar(i: int) -> Exemplar:
    """A risky exemplar of its own (each add is one index change)."""
    text = (
        f"Pretend {_SUBJECTS[i % len(_SUBJECTS)]} {_ACTIONS[i % len(_ACTIONS)]} "
        f"ledger number {i * 7919} whenever the tide chart says {i}"
    )
    return Exemplar(id="", text=text, label="risky", category="prompt_injection", source="test")


@pytest.fixture
async def cached_server(
    data_dir: Path, embedder: SentenceTransformerEmbedder
) -> AsyncIterator[RunningServer]:
    """A gateway with the route cache on (the default size)."""
    config = make_config(data_dir)
    assert config.embedding.route_cache_size > 0
    gateway = Gateway.create(config, embedder=embedder)
    running = await start_server(gateway, port=0)
    yield running
    await running.stop(grace_seconds=0)


async def test_replaced_index_snapshots_are_freed_with_the_route_cache_on(
    cached_server: RunningServer,
) -> None:
    gateway = cached_server.gateway
    exemplars = [new_exemplar(i) for i in range(CHANGES)]
    vectors = await asyncio.to_thread(gateway.index.encode, [e.text for e in exemplars])
    old: list[weakref.ref[ExemplarIndex]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cached_server.port}") as channel:
        checks = pb_grpc.GuardrailServiceStub(channel)
        for i, exemplar in enumerate(exemplars):
            old.append(weakref.ref(gateway.index.index))
            version = await asyncio.to_thread(gateway.index.add, [exemplar], vectors[i : i + 1])
            # A distinct text each (a cache miss), down each path that holds a route:
            # allowed, judged by the critic, judged in the background (shadow), a response.
            text = f"How do I reset the password of account number {i}?"
            policy = ("default", "critic-all", "critic-all-shadow", "")[i % 4]
            if policy:
                prompt = pb.CheckPromptRequest(text=text, policy=policy)
                verdict = (await checks.CheckPrompt(prompt)).verdict
            else:
                draft = pb.CheckResponseRequest(prompt=text, response="Use the reset link.")
                verdict = (await checks.CheckResponse(draft)).verdict
            assert verdict.index_version == version
    await asyncio.gather(*gateway._background)  # the shadow judgements have finished
    current = gateway.index.index
    gc.collect()
    alive = [ref().version for ref in old if ref() is not None]  # type: ignore[union-attr]
    assert alive == [], f"replaced snapshots still alive (versions {alive})"
    cached = gateway.route_cache.values()
    assert cached and all(route.index is current for route in cached)
