"""Config loading: defaults, file, environment, overrides; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from critic.loop import FailMode
from gateway.runtime.config import (
    DEFAULT_BLOCK_AT,
    DEFAULT_ESCALATE_AT,
    ConfigError,
    CriticMode,
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
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
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
    from gateway.runtime.app import Gateway

    path = tmp_path / "c.yaml"
    path.write_text("policies: {default: {constitution: martian}}\n")
    with pytest.raises(ConfigError, match=r"policies\.default\.constitution: 'martian'"):
        Gateway.create(load_config(path, environ={}), environ={})
