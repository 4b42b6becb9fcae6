"""Shared fixtures: the real model loaded once per session, a seeded store, a live server.

Seeding a store embeds the whole starter pack, so it happens once per session;
each test that needs a store gets its own copy of that file. Servers are the
production `start_server` on 127.0.0.1 with a free port. Tests that use the real
model, or live in tests/e2e, are marked `model`; the rest form `scripts/test --fast`,
and `hashing_embedder` / `hashed_data_dir` let a test build a gateway without the model.

Store tests run on both engines through `storage` (SQLite files in a temporary
directory, then a fresh schema of the PostgreSQL database `test` on 127.0.0.1,
which `pg_url` creates and drops). PostgreSQL being down fails those tests
with a message saying so, unless TIERGUARD_TEST_SKIP_PG=1 skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from embeddings_index.database import Storage, scratch_schema
from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.manager import IndexManager
from embeddings_index.vocabulary import CriticMode, FailMode
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import RunningServer, start_server
from gateway.runtime.app import Gateway
from gateway.runtime.config import Config, LLMConfig, Policy, ServerConfig
from router.normalize import normalized_text
from tests.fakes.embedder import HashingEmbedder
from tests.fakes.openai_server import FakeOpenAI

# Fixtures that load the real embedding model (directly or through the ones they use).
MODEL_FIXTURES = frozenset({"embedder", "models_dir"})
# Modules that test the real model itself, some tests without any fixture (an export in a child).
MODEL_MODULES = frozenset({"test_onnx_embedder.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `model` every test that loads the real model or runs end to end (tests/e2e).

    `scripts/test --fast` runs `-m "not model"`: the tests that need no model.
    """
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if (
            MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
            or item.path.is_relative_to(e2e)
            or item.path.name in MODEL_MODULES
        ):
            item.add_marker(pytest.mark.model)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TIERGUARD_* or OPENAI_* variable of the developer's shell leaks into a test.

    TIERGUARD_TEST_* variables steer the tests themselves and stay.
    """
    for key in list(os.environ):
        if key.startswith(("TIERGUARD_", "OPENAI_")) and not key.startswith("TIERGUARD_TEST_"):
            monkeypatch.delenv(key)
    yield


# The test database: CI and the development machines run PostgreSQL there (.ci/run starts it).
PG_TEST_URL = os.environ.get("TIERGUARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The test database's URL, once it answered; fails the tests that need it when it is down."""
    try:
        psycopg.connect(PG_TEST_URL, connect_timeout=5).close()
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {PG_TEST_URL} is not reachable ({' '.join(str(exc).split())})"
        if os.environ.get("TIERGUARD_TEST_SKIP_PG") == "1":
            pytest.skip(f"{reason}; TIERGUARD_TEST_SKIP_PG=1")
        pytest.fail(
            f"{reason}. Start it (as .ci/run does: pg_ctlcluster --skip-systemctl-redirect "
            "$(ls /etc/postgresql) main start), point TIERGUARD_TEST_PG_URL at another "
            "server, or set TIERGUARD_TEST_SKIP_PG=1 to skip the PostgreSQL tests",
            pytrace=False,
        )
    return PG_TEST_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh schema for each test, so tests may run in parallel and again."""
    with scratch_schema(pg_server, "tierguard_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Where a store test keeps its tables: SQLite files, then a PostgreSQL schema."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    place = Storage(url, tmp_path / "stores")
    yield place
    place.close()  # the pool, if a test left a store open


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the whole session."""
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX exports shared by the whole session: the first user exports, the rest reuse it."""
    return tmp_path_factory.mktemp("models")


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


@pytest.fixture(scope="session")
def hashing_embedder() -> HashingEmbedder:
    """The fast lane's deterministic stand-in for the model (tests/fakes/embedder.py)."""
    return HashingEmbedder()


@pytest.fixture(scope="session")
def hashed_store_file(
    hashing_embedder: HashingEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The starter pack embedded by `hashing_embedder`, once per session (a few seconds)."""
    directory = tmp_path_factory.mktemp("hashed")
    manager = IndexManager.open(directory, hashing_embedder, prepare=normalized_text)
    manager.store.close()
    return directory / "exemplars.sqlite3"


@pytest.fixture
def hashed_data_dir(hashed_store_file: Path, tmp_path: Path) -> Path:
    """A fresh data directory whose store is a copy of the hashed one: no model needed."""
    directory = tmp_path / "data"
    directory.mkdir()
    shutil.copy(hashed_store_file, directory / "exemplars.sqlite3")
    return directory


def make_config(data_dir: Path, **changes: object) -> Config:
    """A config on `data_dir` with policies for every critic setting the tests need."""
    policies = {
        "default": Policy(name="default"),
        "transparent": Policy(name="transparent", expose_evidence=True),
        "payflow": Policy(name="payflow", constitution="payflow"),
        "open": Policy(name="open", constitution="payflow", fail_mode=FailMode.OPEN),
        "one-round": Policy(name="one-round", constitution="payflow", max_rounds=1),
        "private": Policy(name="private", constitution="payflow", record_texts=False),
        # every prompt goes to the critic tier, whatever the router's score
        "critic-all": Policy(name="critic-all", escalate_at=0.0, block_at=1.0),
        "critic-all-shadow": Policy(
            name="critic-all-shadow", escalate_at=0.0, block_at=1.0, critic_mode=CriticMode.SHADOW
        ),
        "critic-all-off": Policy(
            name="critic-all-off",
            escalate_at=0.0,
            block_at=1.0,
            critic_mode=CriticMode.OFF,
            fail_mode=FailMode.OPEN,
        ),
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
def fake_llm() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server on loopback; fails the test if called beyond its script."""
    with FakeOpenAI() as fake:
        yield fake
        fake.assert_no_surprises()


def llm_config(fake: FakeOpenAI, **changes: object) -> LLMConfig:
    """Critic (or generator) settings pointing at the fake."""
    values: dict[str, object] = {
        "enabled": True, "base_url": fake.base_url, "api_key": "test-key",
        "model": "fake-critic", "call_timeout_s": 5.0, "max_retries": 1,
        "circuit_failures": 3, "circuit_reset_s": 60.0,
    }  # fmt: skip
    values.update(changes)
    return LLMConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def llm_server(
    data_dir: Path, embedder: SentenceTransformerEmbedder, fake_llm: FakeOpenAI
) -> AsyncIterator[RunningServer]:
    """A running gateway whose critic and generator are the fake LLM."""
    config = make_config(
        data_dir,
        critic=llm_config(fake_llm),
        generator=llm_config(fake_llm, model="fake-generator"),
    )
    gateway = Gateway.create(config, embedder=embedder)
    running = await start_server(gateway, port=0)
    yield running
    await running.stop(grace_seconds=0)


@pytest.fixture
async def llm_stub(llm_server: RunningServer) -> AsyncIterator[pb_grpc.GuardrailServiceStub]:
    """A GuardrailService stub on the LLM-backed gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{llm_server.port}") as chan:
        yield pb_grpc.GuardrailServiceStub(chan)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the running gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.GuardrailServiceStub:
    """A GuardrailService stub on the running gateway."""
    return pb_grpc.GuardrailServiceStub(channel)
