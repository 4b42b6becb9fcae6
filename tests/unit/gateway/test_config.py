"""Config loading: defaults, file, environment, overrides; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DEFAULT_BLOCK_AT, DEFAULT_ESCALATE_AT, ConfigError, load_config
from router.decision import Decision


def test_defaults_need_no_file_and_no_environment() -> None:
    config = load_config(environ={})
    policy = config.policies["default"]
    assert config.default_policy == "default"
    assert (policy.escalate_at, policy.block_at) == (DEFAULT_ESCALATE_AT, DEFAULT_BLOCK_AT)
    assert policy.fallback_decision is Decision.BLOCK and not policy.expose_evidence


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {port: 6000, host: 0.0.0.0}\n"
        "data_dir: /srv/tg\n"
        "default_policy: strict\n"
        "policies:\n"
        "  strict: {escalate_at: 0.2, block_at: 0.8, fallback_decision: block}\n"
        "  lenient: {escalate_at: 0.7, fallback_decision: allow, expose_evidence: true}\n"
    )
    config = load_config(path, environ={"TIERGUARD_PORT": "7000"}, overrides={"data_dir": "/x"})
    assert config.server.port == 7000 and config.server.host == "0.0.0.0"
    assert config.data_dir == Path("/x")
    assert config.default_policy == "strict"
    assert config.policies["strict"].thresholds.escalate_at == 0.2
    assert config.policies["lenient"].fallback_decision is Decision.ALLOW
    assert config.policies["lenient"].expose_evidence is True
    assert config.policies["lenient"].name == "lenient"


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
        (
            "policies: {p: {fallback_decision: revise}}\ndefault_policy: p",
            "policies.p.fallback_decision",
        ),
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
