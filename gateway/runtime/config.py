"""Gateway configuration: parsed once at the edge, frozen, passed down.

Sources, later ones winning: the defaults below, a YAML file (`--config` or
`TIERGUARD_CONFIG`), environment variables (`TIERGUARD_HOST`,
`TIERGUARD_PORT`, `TIERGUARD_DATA_DIR`, `TIERGUARD_MAX_TEXT_CHARS`,
`TIERGUARD_DEFAULT_POLICY`, `TIERGUARD_CRITIC_MODEL`,
`TIERGUARD_GENERATOR_MODEL`, `TIERGUARD_ADMIN_TOKENS`), then command-line flags. The LLM endpoints also
honour the `openai` SDK's own `OPENAI_API_KEY` and `OPENAI_BASE_URL`. A bad
value fails loudly and names its field. Nothing here is read at import time.

Example file::

    server:
      host: 0.0.0.0
      port: 50051
    data_dir: /var/lib/tierguard
    default_policy: default
    embedding:
      backend: onnx             # onnx | onnx-int8 | torch
      max_wait_ms: 0            # micro-batching: longest wait for company
    index:
      approximate_above: 20000  # exact search up to here, IVF above
    critic:
      model: gpt-4o-mini        # any OpenAI-compatible endpoint (OPENAI_BASE_URL)
    policies:
      default:
        escalate_at: 0.75
        block_at: 0.97
      payflow:
        escalate_at: 0.45
        constitution: payflow
        critic_mode: sync       # sync | shadow | off
        fail_mode: closed       # closed (BLOCK) | open (ALLOW, flagged)
        max_rounds: 2
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from critic.chat import LLMSettings
from critic.loop import FailMode
from embeddings_index.faiss_index import IndexOptions
from router.decision import Thresholds

__all__ = [
    "DEFAULT_BLOCK_AT",
    "DEFAULT_ESCALATE_AT",
    "Config",
    "ConfigError",
    "CriticMode",
    "EmbeddingBackend",
    "EmbeddingConfig",
    "LLMConfig",
    "Policy",
    "ServerConfig",
    "Tenant",
    "load_config",
    "parse_policy",
]

# Chosen with `tierguard eval` on ../shared/datasets (see README, "Tuning thresholds").
DEFAULT_ESCALATE_AT = 0.75
DEFAULT_BLOCK_AT = 0.97


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field at fault."""


class CriticMode(enum.Enum):
    """How a policy runs the critic tier."""

    SYNC = "sync"  # the caller waits for the critic
    SHADOW = "shadow"  # the caller gets the fail mode at once; the critic runs and is recorded
    OFF = "off"  # escalations are resolved by the fail mode


@dataclass(frozen=True)
class Policy:
    """How checks under one policy name are decided.

    Attributes:
        name: The policy's name, as callers select it.
        escalate_at: Risk at or above which a text goes to the critic tier.
        block_at: Risk at or above which a text is blocked without the critic.
        k: Nearest exemplars to consider (0: the scoring model's own k).
        constitution: Name of the constitution the critic applies
            (critic/constitutions/*.yaml).
        critic_mode: sync, shadow or off.
        fail_mode: What the critic tier answers when it cannot judge: closed
            (BLOCK) or open (ALLOW); either way the verdict is flagged.
        max_rounds: Most revisions the critic may attempt for one response.
        critic_budget_ms: Time the critic tier may take when the caller sets
            no deadline (a caller's deadline always wins if shorter).
        record_texts: Whether critic records and the decision log keep texts
            (else SHA-256 hashes).
        escalation_budget: Share of requests the policy may escalate to the
            critic tier, in [0, 1] (0: no budget); GetStats reports breaches.
        expose_evidence: Whether verdicts carry exemplar texts and raw
            similarities (ids and categories are always there). Off by
            default: a caller who sees similarities can probe the deny list.
    """

    name: str = "default"
    escalate_at: float = DEFAULT_ESCALATE_AT
    block_at: float = DEFAULT_BLOCK_AT
    k: int = 0
    constitution: str = "general"
    critic_mode: CriticMode = CriticMode.SYNC
    fail_mode: FailMode = FailMode.CLOSED
    max_rounds: int = 2
    critic_budget_ms: int = 15_000
    record_texts: bool = True
    escalation_budget: float = 0.0
    expose_evidence: bool = False

    @property
    def thresholds(self) -> Thresholds:
        """The policy's cut points on the risk score."""
        return Thresholds(self.escalate_at, self.block_at)


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener and request limits.

    Attributes:
        host: Interface to listen on.
        port: Port to listen on (0 picks a free one).
        max_text_chars: Longest text a check accepts, in characters.
        max_concurrent_checks: Checks in flight beyond which new ones get
            RESOURCE_EXHAUSTED instead of queueing without bound.
        grace_seconds: How long a stopping server lets checks in flight finish.
        require_api_key: Whether check calls need a tenant API key (or an
            admin token) in `authorization: Bearer <key>`.
        tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS.
        tls_key_file: PEM private key of the certificate.
        tls_client_ca_file: PEM CA bundle; when set, clients must present a
            certificate it signed (mutual TLS).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_text_chars: int = 20_000
    max_concurrent_checks: int = 512
    grace_seconds: float = 5.0
    require_api_key: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None


class EmbeddingBackend(enum.Enum):
    """What runs the embedding model.

    TORCH is sentence-transformers on torch (the reference). ONNX is the same
    graph on ONNX Runtime, exported once into `<data_dir>/models/` (same
    vectors to float rounding, about twice as fast). ONNX_INT8 is that graph
    with int8 weights: faster again, but its vectors drift, so its exemplar
    vectors are its own (`benchmarks/agreement.py` measures the decisions
    that change).
    """

    TORCH = "torch"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"


@dataclass(frozen=True)
class EmbeddingConfig:
    """The tier-1 embedder.

    Attributes:
        model_path: A sentence-transformers directory; None for the packaged
            all-MiniLM-L6-v2.
        backend: "onnx" (default), "onnx-int8" or "torch"; see `EmbeddingBackend`.
        models_dir: Where ONNX exports are cached (default `<data_dir>/models`);
            gateways on one host may share it.
        threads: Inference threads for the ONNX backends (0: every core).
        token_budget: ONNX backends: most word pieces (rows x padded length) per
            model call; a batch is cut into calls of similar-length texts under it.
        max_batch: Most texts encoded together.
        max_wait_ms: Longest a request waits for company when the model is idle.
        cache_size: Vectors of recent texts kept in memory (0: none).
        route_cache_size: Router results of recent (text, policy, index version)
            kept in memory; a change of index or policy never hits a stale entry.
    """

    model_path: Path | None = None
    backend: EmbeddingBackend = EmbeddingBackend.ONNX
    models_dir: Path | None = None
    threads: int = 0
    token_budget: int = 1024
    max_batch: int = 64
    max_wait_ms: float = 0.0
    cache_size: int = 10_000
    route_cache_size: int = 10_000


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible model endpoint (the critic's, or the upstream generator's).

    Attributes:
        enabled: True or False forces it; None (default) turns it on when an
            endpoint or key is configured here or in OPENAI_BASE_URL / OPENAI_API_KEY.
        model: Model name.
        base_url: Endpoint (else OPENAI_BASE_URL, else api.openai.com).
        api_key: Key (else OPENAI_API_KEY). Prefer the environment to files.
        call_timeout_s: Longest single HTTP call.
        max_retries: Retries after 429, 5xx, timeouts and dropped connections.
        circuit_failures: Consecutive failures that open the circuit breaker.
        circuit_reset_s: Seconds before an open circuit lets a trial call through.
        price_prompt_per_1m_usd: Price per million prompt tokens (cost accounting).
        price_completion_per_1m_usd: Price per million completion tokens.
        system_prompt: The generator's system prompt (ignored for the critic).
    """

    enabled: bool | None = None
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = None
    call_timeout_s: float = 10.0
    max_retries: int = 2
    circuit_failures: int = 5
    circuit_reset_s: float = 30.0
    price_prompt_per_1m_usd: float = 0.15
    price_completion_per_1m_usd: float = 0.60
    system_prompt: str = "You are a helpful assistant."

    def is_enabled(self, environ: Mapping[str, str]) -> bool:
        """Whether this endpoint should be used."""
        if self.enabled is not None:
            return self.enabled
        return bool(
            self.base_url or self.api_key or environ.get("OPENAI_BASE_URL")
            or environ.get("OPENAI_API_KEY")
        )  # fmt: skip

    def settings(self, environ: Mapping[str, str]) -> LLMSettings:
        """The critic package's settings for this endpoint."""
        api_key = self.api_key or environ.get("OPENAI_API_KEY") or None
        base_url = self.base_url or environ.get("OPENAI_BASE_URL") or None
        return LLMSettings(
            model=self.model,
            base_url=base_url,
            api_key=api_key or ("unused" if base_url else None),
            call_timeout_s=self.call_timeout_s,
            max_retries=self.max_retries,
            circuit_failures=self.circuit_failures,
            circuit_reset_s=self.circuit_reset_s,
            price_prompt_per_1m_usd=self.price_prompt_per_1m_usd,
            price_completion_per_1m_usd=self.price_completion_per_1m_usd,
        )


@dataclass(frozen=True)
class Tenant:
    """A calling service: its API keys and the policies it may use.

    Attributes:
        name: The tenant's name (logs and audit say it, never a key).
        api_keys: Keys it sends as `authorization: Bearer <key>`.
        policy: The policy its requests get when they name none.
        allowed_policies: Policies it may name (default: only `policy`).
    """

    name: str
    api_keys: tuple[str, ...]
    policy: str
    allowed_policies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """Everything the gateway needs to start."""

    server: ServerConfig = field(default_factory=ServerConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    index: IndexOptions = field(default_factory=IndexOptions)
    critic: LLMConfig = field(default_factory=LLMConfig)
    generator: LLMConfig = field(default_factory=lambda: LLMConfig(enabled=False))
    data_dir: Path = Path("tierguard-data")
    default_policy: str = "default"
    policies: Mapping[str, Policy] = field(default_factory=lambda: {"default": Policy()})
    scoring_model: Path | None = None
    admin_tokens: Mapping[str, str] = field(default_factory=dict)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.default_policy not in self.policies:
            raise ConfigError(
                f"default_policy: {self.default_policy!r} is not one of the policies "
                f"{sorted(self.policies)}"
            )
        for tenant in self.tenants.values():
            for name in (tenant.policy, *tenant.allowed_policies):
                if name not in self.policies:
                    raise ConfigError(
                        f"tenants.{tenant.name}: policy {name!r} is not one of the policies "
                        f"{sorted(self.policies)}"
                    )
        if bool(self.server.tls_cert_file) != bool(self.server.tls_key_file):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together")

    def policy(self, name: str) -> Policy | None:
        """The policy called `name`, or None."""
        return self.policies.get(name)


_ENV = {
    "TIERGUARD_HOST": ("server", "host"),
    "TIERGUARD_PORT": ("server", "port"),
    "TIERGUARD_MAX_TEXT_CHARS": ("server", "max_text_chars"),
    "TIERGUARD_DATA_DIR": ("data_dir",),
    "TIERGUARD_DEFAULT_POLICY": ("default_policy",),
    "TIERGUARD_CRITIC_MODEL": ("critic", "model"),
    "TIERGUARD_GENERATOR_MODEL": ("generator", "model"),
}


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a Config from defaults, a YAML file, the environment and overrides.

    Args:
        path: YAML file; None falls back to `TIERGUARD_CONFIG`, then to no file.
        environ: The environment to read (default: os.environ).
        overrides: Dotted keys to values, e.g. {"server.port": 50052}, as the CLI sets them.

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = path or (Path(env["TIERGUARD_CONFIG"]) if env.get("TIERGUARD_CONFIG") else None)
    if path is not None:
        raw = _read_yaml(Path(path))
        raw["source"] = str(path)
    for variable, keys in _ENV.items():
        if env.get(variable):
            _set_dotted(raw, keys, env[variable])
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, tuple(dotted.split(".")), value)
    if env.get("TIERGUARD_ADMIN_TOKENS"):
        tokens = [t.strip() for t in env["TIERGUARD_ADMIN_TOKENS"].split(",") if t.strip()]
        raw.setdefault("admin", {}).setdefault("tokens", []).extend(tokens)
    return _parse_config(raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return doc


def _set_dotted(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _parse_config(raw: Mapping[str, Any]) -> Config:
    _reject_unknown(
        "", raw, {f.name for f in dataclasses.fields(Config)} - {"admin_tokens"} | {"admin"}
    )
    policies_raw = raw.get("policies") or {"default": {}}
    if not isinstance(policies_raw, Mapping) or not policies_raw:
        raise ConfigError("policies: must be a mapping of policy names to settings")
    policies = {
        str(name): parse_policy(str(name), body or {}) for name, body in policies_raw.items()
    }
    return Config(
        server=_parse_section("server", ServerConfig, raw.get("server") or {}),
        embedding=_parse_section("embedding", EmbeddingConfig, raw.get("embedding") or {}),
        index=_parse_section("index", IndexOptions, raw.get("index") or {}),
        critic=_parse_section("critic", LLMConfig, raw.get("critic") or {}),
        generator=_parse_section(
            "generator", LLMConfig, {"enabled": False, **(raw.get("generator") or {})}
        ),
        data_dir=Path(str(raw.get("data_dir", Config.data_dir))),
        default_policy=str(raw.get("default_policy", "default")),
        policies=policies,
        scoring_model=Path(str(raw["scoring_model"])) if raw.get("scoring_model") else None,
        admin_tokens=_parse_admin_tokens(raw.get("admin") or {}),
        tenants=_parse_tenants(raw.get("tenants") or {}),
        source=Path(str(raw["source"])) if raw.get("source") else None,
    )


def _parse_admin_tokens(admin: Mapping[str, Any]) -> dict[str, str]:
    """Admin credentials by name: `tokens` lists strings or {name, token} mappings.

    A bare token is named by a fingerprint of itself, so logs and the audit
    log can say who acted without ever holding the token.
    """
    if not isinstance(admin, Mapping):
        raise ConfigError("admin: must be a mapping")
    _reject_unknown("admin", admin, {"tokens"})
    tokens: dict[str, str] = {}
    for i, entry in enumerate(admin.get("tokens") or []):
        if isinstance(entry, str) and entry:
            name = "admin-" + hashlib.sha256(entry.encode()).hexdigest()[:8]
            tokens[name] = entry
        elif isinstance(entry, Mapping) and entry.get("name") and entry.get("token"):
            tokens[str(entry["name"])] = str(entry["token"])
        else:
            raise ConfigError(f"admin.tokens[{i}]: must be a token or {{name, token}}")
        if len(list(tokens.values())[-1]) < 16:
            raise ConfigError(f"admin.tokens[{i}]: tokens must be at least 16 characters")
    return tokens


def _parse_tenants(raw: Mapping[str, Any]) -> dict[str, Tenant]:
    if not isinstance(raw, Mapping):
        raise ConfigError("tenants: must be a mapping of tenant names to settings")
    tenants = {}
    for name, body in raw.items():
        where = f"tenants.{name}"
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: must be a mapping")
        _reject_unknown(where, body, {"api_keys", "policy", "allowed_policies"})
        keys = body.get("api_keys") or []
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and len(k) >= 16 for k in keys)
        ):
            raise ConfigError(f"{where}.api_keys: a list of keys of at least 16 characters")
        policy = str(body.get("policy") or "default")
        allowed = tuple(str(p) for p in body.get("allowed_policies") or [policy])
        tenants[str(name)] = Tenant(str(name), tuple(keys), policy, allowed)
    return tenants


def parse_policy(name: str, body: Mapping[str, Any]) -> Policy:
    """A validated policy from plain values; errors name `policies.<name>.<field>`."""
    where = f"policies.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    policy = _parse_section(where, Policy, {**body, "name": name})
    try:
        policy.thresholds  # noqa: B018 - validates the pair
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return policy


def _reject_unknown(where: str, body: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})"
        )


def _parse_section(where: str, cls: type, body: Mapping[str, Any]) -> Any:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(where, body, set(fields))
    values = {key: _coerce(f"{where}.{key}", fields[key], value) for key, value in body.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a check across fields, or a value the type cannot take
        raise ConfigError(f"{where}: {exc}") from None


_ENUMS: dict[str, type[enum.Enum]] = {
    "CriticMode": CriticMode,
    "FailMode": FailMode,
    "EmbeddingBackend": EmbeddingBackend,
}


def _coerce(where: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "float":
            number = float(value)
            if where.endswith(("escalate_at", "block_at")) and not 0.0 <= number <= 1.0:
                raise ValueError("must be in [0, 1]")
            if number < 0:
                raise ValueError("must not be negative")
            return number
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError("must be a whole number")
            number = int(value)
            if number < 0 or (where.endswith("port") and number > 65535):
                raise ValueError("out of range")
            return number
        if kind.endswith(" | None") and value is None:
            return None
        kind = kind.removesuffix(" | None")
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError("must be true or false")
        if kind in _ENUMS:
            enum_type = _ENUMS[kind]
            try:
                return enum_type(str(value).lower())
            except ValueError:
                choices = " or ".join(repr(m.value) for m in enum_type)
                raise ValueError(f"must be {choices}") from None
        if kind == "Path":
            return Path(str(value)) if value else None
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value {value!r} ({exc})") from None
