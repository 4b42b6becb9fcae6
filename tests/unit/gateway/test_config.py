"""Config loading: defaults, file, environment, overrides; errors name the field."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from critic.chat import LLMSettings
from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.vocabulary import CriticMode, FailMode
from gateway.api.server import reload_config
from gateway.runtime.app import Gateway
from gateway.runtime.auth import Role
from gateway.runtime.config import (
    DEFAULT_BLOCK_AT,
    DEFAULT_ESCALATE_AT,
    ConfigError,
    EmbeddingBackend,
    load_config,
)


def test_defaults_need_no_file_and_no_environment() -> None:
    config = load_config(environ={})
    policy = config.policies["default"]
    assert config.default_policy == "default"
    assert (policy.escalate_at, policy.block_at) == (DEFAULT_ESCALATE_AT, DEFAULT_BLOCK_AT)
    assert policy.fail_mode is FailMode.CLOSED and policy.critic_mode is CriticMode.SYNC
    assert policy.constitution == "general" and not policy.expose_evidence
    assert not config.critic.is_enabled({}) and not config.generator.is_enabled({})


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {port: 6000, host: 0.0.0.0}\n"
        "data_dir: /srv/tg\n"
        "default_policy: strict\n"
        "policies:\n"
        "  strict: {escalate_at: 0.2, block_at: 0.8, fail_mode: closed}\n"
        "  lenient: {escalate_at: 0.7, fail_mode: open, expose_evidence: true,\n"
        "            critic_mode: shadow, constitution: payflow, max_rounds: 3}\n"
    )
    config = load_config(path, environ={"TIERGUARD_PORT": "7000"}, overrides={"data_dir": "/x"})
    assert config.server.port == 7000 and config.server.host == "0.0.0.0"
    assert config.data_dir == Path("/x")
    assert config.default_policy == "strict"
    assert config.policies["strict"].thresholds.escalate_at == 0.2
    lenient = config.policies["lenient"]
    assert lenient.fail_mode is FailMode.OPEN and lenient.critic_mode is CriticMode.SHADOW
    assert lenient.constitution == "payflow" and lenient.max_rounds == 3
    assert config.policies["lenient"].expose_evidence is True
    assert config.policies["lenient"].name == "lenient"


def test_embedding_backend_and_index_structure_are_configurable(tmp_path: Path) -> None:
    assert load_config(environ={}).embedding.backend is EmbeddingBackend.ONNX
    path = tmp_path / "c.yaml"
    path.write_text(
        "embedding: {backend: ONNX-int8, models_dir: /srv/models, threads: 1}\n"
        "index: {approximate_above: 5000, structure: hnsw, ef_search: 64}\n"
    )
    config = load_config(path, environ={})
    assert config.embedding.backend is EmbeddingBackend.ONNX_INT8
    assert config.embedding.models_dir == Path("/srv/models") and config.embedding.threads == 1
    assert config.index.structure_for(5000) == "flat"
    assert config.index.structure_for(5001) == "hnsw" and config.index.ef_search == 64


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 6001}\n")
    assert load_config(environ={"TIERGUARD_CONFIG": str(path)}).server.port == 6001


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("server: {port: 70000}", "server.port"),
        ("server: {port: abc}", "server.port"),
        ("server: {colour: red}", "server.colour"),
        ("policies: {p: {escalate_at: 1.5}}\ndefault_policy: p", "policies.p.escalate_at"),
        ("policies: {p: {escalate_at: 0.9, block_at: 0.5}}\ndefault_policy: p", "policies.p"),
        ("policies: {p: {fail_mode: maybe}}\ndefault_policy: p", "policies.p.fail_mode"),
        ("policies: {p: {critic_mode: later}}\ndefault_policy: p", "policies.p.critic_mode"),
        ("policies: {p: {max_rounds: 1.5}}\ndefault_policy: p", "policies.p.max_rounds"),
        ("critic: {call_timeout_s: -1}", "critic.call_timeout_s"),
        ("embedding: {backend: gpu}", "embedding.backend"),
        ("embedding: {max_batch: 0}", "embedding.max_batch: .*between 1 and"),
        ("metrics: {port: 70000}", "metrics.port"),
        ("server: {workers: 0}", "server.workers: .*between 1 and 64"),
        ("server: {workers: 65}", "server.workers: .*between 1 and 64"),
        ("server: {workers: 1.5}", "server.workers"),
        ("store: {url: 'mysql://db/x'}", "store.url: must be a postgresql:// URL"),
        ("store: {url: ''}", "store.url: .*got empty text"),
        ("store: {pool_size: 0}", "store.pool_size"),
        ("store: {poll_s: 0}", "store: poll_s: must be positive"),
        ("store: {poll_s: -1}", "store.poll_s"),
        ("store: {decision_retention_days: -1}", "store.decision_retention_days: .*negative"),
        ("store: {decision_retention_days: 1e9}", "store: decision_retention_days: must be 0"),
        ("stream: {window_chars: 0}", "stream"),
        ("conversation: {session_decay: 1.5}", "conversation"),
        ("policies: {p: {stream_mode: later}}\ndefault_policy: p", "policies.p.stream_mode"),
        ("embedding: {max_batch_chars: 0}", "embedding.max_batch_chars"),
        ("index: {structure: kdtree}", "index: structure"),
        ("index: {nprobe: 0}", "index: nprobe"),
        ("index: {approximate_above: many}", "index.approximate_above"),
        ("policies: {p: {}}\ndefault_policy: q", "default_policy"),
        ("surprise: 1", "surprise"),
        ("- a list", "top level"),
        ("server: [unclosed", "not valid YAML"),
    ],
)
def test_bad_values_name_their_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace(r"\.*", ".*")):
        load_config(path, environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_critic_endpoint_comes_from_the_sdk_environment_and_model_from_ours() -> None:
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "TIERGUARD_CRITIC_MODEL": "llama3"}
    config = load_config(environ=env)
    assert config.critic.is_enabled(env) and config.critic.model == "llama3"
    settings = config.critic.settings(env)
    assert settings.base_url == "http://127.0.0.1:9/v1" and settings.api_key == "unused"
    assert not config.generator.is_enabled(env)  # the generator is opt-in


def test_critic_can_be_forced_off(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("critic: {enabled: false}\n")
    env = {"OPENAI_API_KEY": "sk-test"}
    assert not load_config(path, environ=env).critic.is_enabled(env)


def test_a_policy_naming_an_unknown_constitution_stops_the_gateway(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("policies: {default: {constitution: martian}}\n")
    with pytest.raises(ConfigError, match=r"policies\.default\.constitution: 'martian'"):
        Gateway.create(load_config(path, environ={}), environ={})


# --- broken files: one line naming the field (and the file), at start and on SIGHUP ---

TENANT_KEY = "tenant-key-0123456789abcdef"
FILE_ADMIN_TOKEN = "file-admin-token-0123456789"
GOOD = (
    "server: {require_api_key: true}\n"
    "policies: {default: {}, demo: {escalate_at: 0.5}}\n"
    f"tenants: {{acme: {{api_keys: [{TENANT_KEY}], policy: demo}}}}\n"
    f"admin: {{tokens: [{FILE_ADMIN_TOKEN}]}}\n"
)
BROKEN: list[tuple[str, bytes, str]] = [
    ("empty", b"", "no settings"),
    ("whitespace", b"  \n\t\n\n", "no settings"),
    ("comments", b"# tierguard\n# nothing yet\n", "no settings"),
    ("null document", b"~\n", "no settings"),
    ("invalid UTF-8", b"server: {host: caf\xe9}\n", "not UTF-8"),
    ("binary", bytes(range(256)) * 4, "not UTF-8"),
    ("control characters", b"\x00\x01\x02tierguard", "not valid YAML"),
    ("list on top", b"- server\n- policies\n", "top level"),
    ("text on top", b"just some words\n", "top level"),
    ("two documents", b"server: {port: 1}\n---\nserver: {port: 2}\n", "not valid YAML"),
    ("key twice", b"server: {require_api_key: true}\nserver: {port: 6000}\n", "'server' twice"),
    ("deep nesting", b"[" * 5000, "nested too deeply"),
    ("huge literal", b"server: {port: " + b"9" * 5000 + b"}\n", "not valid YAML"),
    (
        "max_rounds .inf",
        b"policies: {default: {max_rounds: .inf}}\n",
        "policies.default.max_rounds",
    ),
    (
        "max_rounds .nan",
        b"policies: {default: {max_rounds: .nan}}\n",
        "policies.default.max_rounds",
    ),
    ("max_rounds bool", b"policies: {default: {max_rounds: yes}}\n", "policies.default.max_rounds"),
    (
        "escalate_at .nan",
        b"policies: {default: {escalate_at: .nan}}\n",
        "policies.default.escalate_at",
    ),
    ("timeout .inf", b"critic: {call_timeout_s: .inf}\n", "critic.call_timeout_s"),
    ("grace .nan", b"server: {grace_seconds: .nan}\n", "server.grace_seconds"),
    ("grace bool", b"server: {grace_seconds: true}\n", "server.grace_seconds"),
    ("wait .inf", b"embedding: {max_wait_ms: .inf}\n", "embedding.max_wait_ms"),
    (
        "huge int",
        b"server: {max_concurrent_checks: " + b"9" * 400 + b"}\n",
        "server.max_concurrent_checks",
    ),
    ("int over C int", b"embedding: {cache_size: 4294967296}\n", "embedding.cache_size"),
    ("text too long to frame", b"server: {max_text_chars: 1000000000}\n", "server.max_text_chars"),
    ("nprobe bool", b"index: {nprobe: true}\n", "index.nprobe"),
    ("policy name a number", b"policies: {1: {max_rounds: 1}, default: {}}\n", "policies.1"),
    ("mixed unknown keys", b"server: {1: 2, colour: red}\n", "server.1"),
    ("mixed top-level keys", b"2: two\nsurprise: 1\n", "2: unknown setting"),
    (
        "tenant name a number",
        f"tenants: {{7: {{api_keys: [{TENANT_KEY}]}}}}\n".encode(),
        "tenants.7",
    ),
    (
        "tenant policies as text",
        f"tenants: {{a: {{api_keys: [{TENANT_KEY}], allowed_policies: default}}}}\n".encode(),
        "tenants.a.allowed_policies",
    ),
    ("admin tokens as text", f"admin: {{tokens: {FILE_ADMIN_TOKEN}}}\n".encode(), "admin.tokens"),
    ("admin a list", b"admin: [x]\n", "admin"),
    ("section a number", b"server: 5\n", "server"),
    ("data_dir a list", b"data_dir: [a, b]\n", "data_dir"),
    ("model a list", b"critic: {model: [gpt-4o-mini]}\n", "critic.model"),
    ("host a date", b"server: {host: 2020-01-01}\n", "server.host"),
    (
        "critic_mode a list",
        b"policies: {default: {critic_mode: [sync]}}\n",
        "policies.default.critic_mode",
    ),
    ("backoff inverted", b"critic: {backoff_base_s: 3, backoff_max_s: 1}\n", "backoff_max_s"),
    ("require_api_key maybe", b"server: {require_api_key: maybe}\n", "server.require_api_key"),
]


@pytest.mark.parametrize(
    ("body", "expected"), [row[1:] for row in BROKEN], ids=[r[0] for r in BROKEN]
)
def test_broken_files_are_one_line_errors_naming_the_field_and_file(
    tmp_path: Path, body: bytes, expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


@pytest.fixture(scope="module")
async def reloadable(
    tmp_path_factory: pytest.TempPathFactory,
    seeded_store_file: Path,
    embedder: SentenceTransformerEmbedder,
) -> AsyncIterator[Gateway]:
    """One gateway for every reload case: each case leaves it as it found it."""
    directory = tmp_path_factory.mktemp("reload")
    shutil.copy(seeded_store_file, directory / "exemplars.sqlite3")
    path = directory / "tierguard.yaml"
    path.write_text(GOOD)
    gateway = Gateway.create(load_config(path, environ={}, overrides={"data_dir": directory}),
                             embedder=embedder, environ={})  # fmt: skip
    yield gateway
    await gateway.aclose()


@pytest.fixture
def gateway(reloadable: Gateway) -> Iterator[Gateway]:
    """The shared gateway with its good file and config back after the test."""
    config = reloadable.config
    yield reloadable
    assert config.source is not None
    config.source.write_text(GOOD)
    if reloadable.config is not config:
        reloadable.reload(config)


def assert_auth_as_it_was(gateway: Gateway) -> None:
    assert gateway.config.server.require_api_key
    anonymous, tenant = gateway.credentials.identify(None), gateway.credentials.identify(TENANT_KEY)
    admin = gateway.credentials.identify(FILE_ADMIN_TOKEN)
    assert anonymous is not None and anonymous.role is Role.ANONYMOUS
    assert tenant is not None and tenant.role is Role.TENANT and tenant.policy == "demo"
    assert admin is not None and admin.role is Role.ADMIN


RELOAD_ONLY: list[tuple[str, str, str]] = [
    ("api keys turned off", GOOD.replace("require_api_key: true", "require_api_key: false"),
     "server.require_api_key"),
    ("server section dropped", GOOD.split("\n", 1)[1], "server.require_api_key"),
    ("every tenant removed", GOOD.replace(f"tenants: {{acme: {{api_keys: [{TENANT_KEY}], policy: demo}}}}\n", ""),
     "tenants"),
    ("every admin token removed", GOOD.replace(f"admin: {{tokens: [{FILE_ADMIN_TOKEN}]}}\n", ""),
     "admin.tokens"),
]  # fmt: skip


# a reload keeps the running data_dir: the file's is not read
ON_RELOAD = [row for row in BROKEN if row[0] != "data_dir a list"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [row[1:] for row in ON_RELOAD] + [(b.encode(), e) for _, b, e in RELOAD_ONLY],
    ids=[r[0] for r in ON_RELOAD] + [r[0] for r in RELOAD_ONLY],
)
def test_a_reload_rejects_what_it_must_not_take_and_keeps_the_old_config(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, body: bytes, expected: str
) -> None:
    before = gateway.config
    assert before.source is not None
    before.source.write_bytes(body)
    with caplog.at_level(logging.ERROR, logger="gateway.api.server"):
        assert reload_config(gateway) is False
    assert gateway.config is before
    assert_auth_as_it_was(gateway)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert expected in message and str(before.source) in message and "stays in force" in message
    assert record.exc_info is None  # an expected rejection, not a crash


def test_a_reload_may_rotate_keys_and_tighten_auth(gateway: Gateway) -> None:
    assert gateway.config.source is not None
    rotated = GOOD.replace(TENANT_KEY, "rotated-key-0123456789abcdef")
    gateway.config.source.write_text(rotated)
    assert reload_config(gateway) is True
    tenant = gateway.credentials.identify("rotated-key-0123456789abcdef")
    assert tenant is not None and tenant.role is Role.TENANT
    assert gateway.credentials.identify(TENANT_KEY) is None


def test_unquoted_off_is_the_critic_mode_off(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("policies: {default: {critic_mode: off}}\n")  # YAML 1.1 reads `off` as false
    assert load_config(path, environ={}).policies["default"].critic_mode is CriticMode.OFF


def test_the_store_url_comes_from_the_file_the_environment_or_the_flag(tmp_path: Path) -> None:
    assert load_config(environ={}).store.url is None  # SQLite files in data_dir
    path = tmp_path / "c.yaml"
    path.write_text("store: {url: 'postgresql://tg@db-a/tierguard', pool_size: 4}\n")
    assert load_config(path, environ={}).store.url == "postgresql://tg@db-a/tierguard"
    env = {"TIERGUARD_STORE_URL": "postgres://tg@db-b/tierguard"}
    assert load_config(path, environ=env).store.url == env["TIERGUARD_STORE_URL"]
    flag = load_config(path, environ=env, overrides={"store.url": "postgresql://tg@db-c/x"})
    assert flag.store.url == "postgresql://tg@db-c/x" and flag.store.pool_size == 4


def test_a_store_url_of_another_kind_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"TIERGUARD_STORE_URL": "mysql://root:hunter2@db/x"})
    message = str(caught.value)
    assert message.startswith("environment variable TIERGUARD_STORE_URL: store.url: ")
    assert "mysql://" in message and "hunter2" not in message


def test_environment_errors_name_the_variable_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n")  # an empty section the variable has to create
    with pytest.raises(ConfigError, match=r"TIERGUARD_PORT: server\.port"):
        load_config(path, environ={"TIERGUARD_PORT": "http"})
    assert load_config(path, environ={"TIERGUARD_PORT": "6002"}).server.port == 6002


def _non_default(f: dataclasses.Field[Any]) -> Any:
    kind = str(f.type).removesuffix(" | None")
    default = f.default if f.default is not None else None
    if kind == "str":
        return f"set-{f.name}"
    if kind == "int":
        return int(default or 0) + 7
    if kind == "float":
        return float(default or 0.0) + 1.25
    raise AssertionError(f"LLMSettings.{f.name}: no test value for {f.type}")


@pytest.mark.parametrize("section", ["critic", "generator"])
def test_every_llm_setting_can_be_set_from_the_file(tmp_path: Path, section: str) -> None:
    fields = dataclasses.fields(LLMSettings)
    wanted = {f.name: _non_default(f) for f in fields}
    wanted["backoff_max_s"] = wanted["backoff_base_s"] + 5  # keep the pair in order
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {"enabled": True, **wanted}}))
    settings = getattr(load_config(path, environ={}), section).settings({})
    assert {f.name: getattr(settings, f.name) for f in fields} == wanted
    assert all(wanted[f.name] != f.default for f in fields)  # every field really changed


def test_workers_come_from_the_file_or_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {workers: 3}\n")
    assert load_config(environ={}).server.workers == 1
    assert load_config(path, environ={}).server.workers == 3
    flagged = load_config(path, environ={}, overrides={"server.workers": 2})
    assert flagged.server.workers == 2
    with pytest.raises(ConfigError, match=r"^command line: server\.workers: .*between 1 and 64"):
        load_config(path, environ={}, overrides={"server.workers": 99})
