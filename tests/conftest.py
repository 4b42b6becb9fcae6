"""Shared fixtures: the real model loaded once per session, a seeded store, a live server.

Seeding a store embeds the whole starter pack, so it happens once per session;
each test that needs a store gets its own copy of that file. Servers are the
production `start_server` on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.manager import IndexManager
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.app import Gateway
from gateway.config import Config, Policy, ServerConfig
from gateway.server import RunningServer, start_server
from router.normalize import normalized_text


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TIERGUARD_* or OPENAI_* variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith(("TIERGUARD_", "OPENAI_")):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the whole session."""
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def seeded_store_file(
    embedder: SentenceTransformerEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An exemplar store holding the embedded starter pack, built once per session."""
    directory = tmp_path_factory.mktemp("seeded")
    manager = IndexManager.open(directory, embedder, prepare=normalized_text)
    manager.store.close()
    return directory / "exemplars.sqlite3"


@pytest.fixture
def data_dir(seeded_store_file: Path, tmp_path: Path) -> Path:
    """A fresh data directory whose store is a copy of the seeded one."""
    directory = tmp_path / "data"
    directory.mkdir()
    shutil.copy(seeded_store_file, directory / "exemplars.sqlite3")
    return directory


def make_config(data_dir: Path, **changes: object) -> Config:
    """A config on `data_dir` with two policies: the default and an evidence-exposing one."""
    policies = {
        "default": Policy(name="default"),
        "transparent": Policy(name="transparent", expose_evidence=True),
    }
    values: dict[str, object] = {
        "data_dir": data_dir,
        "policies": policies,
        "server": ServerConfig(host="127.0.0.1", port=0, max_text_chars=2000),
    }
    values.update(changes)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
async def server(
    data_dir: Path, embedder: SentenceTransformerEmbedder
) -> AsyncIterator[RunningServer]:
    """A running gateway on a loopback port, stopped after the test."""
    gateway = Gateway.create(make_config(data_dir), embedder=embedder)
    running = await start_server(gateway, port=0)
    yield running
    await running.stop(grace_seconds=0)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the running gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.GuardrailServiceStub:
    """A GuardrailService stub on the running gateway."""
    return pb_grpc.GuardrailServiceStub(channel)
