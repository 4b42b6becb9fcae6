"""Gateway configuration: parsed once at the edge, frozen, passed down.

Sources, later ones winning: the defaults below, a YAML file (`--config` or
`TIERGUARD_CONFIG`), environment variables (`TIERGUARD_HOST`,
`TIERGUARD_PORT`, `TIERGUARD_DATA_DIR`, `TIERGUARD_MAX_TEXT_CHARS`,
`TIERGUARD_DEFAULT_POLICY`, `TIERGUARD_CRITIC_MODEL`,
`TIERGUARD_GENERATOR_MODEL`, `TIERGUARD_ADMIN_TOKENS`, `TIERGUARD_METRICS_PORT`,
`TIERGUARD_STORE_URL`), then command-line flags. The LLM endpoints also
honour the `openai` SDK's own `OPENAI_API_KEY` and `OPENAI_BASE_URL`. A bad
value fails loudly, in one line naming its field and where it was set. A
named file that is empty (or only comments) is an error, not the defaults. A
reload (SIGHUP) also refuses a file that would turn `require_api_key` off or
drop every tenant or every admin token (`check_reload`): that takes a restart.
Nothing here is read at import time.

Example file::

    server:
      host: 0.0.0.0
      port: 50051
    data_dir: /var/lib/tierguard
    store:
      url: postgresql://tierguard@db.internal:5432/tierguard   # unset: SQLite in data_dir
      decision_retention_days: 30   # the decision log keeps 30 days (0: everything)
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
        escalate_at: 0.82
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
import math
import os
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from critic.chat import LLMSettings
from embeddings_index.database import describe_url, is_postgres_url
from embeddings_index.faiss_index import IndexOptions
from embeddings_index.vocabulary import CriticMode, FailMode, StreamMode
from router.decision import Thresholds

__all__ = [
    "DEFAULT_BLOCK_AT",
    "DEFAULT_ESCALATE_AT",
    "Config",
    "ConfigError",
    "ConversationConfig",
    "CriticMode",
    "EmbeddingBackend",
    "EmbeddingConfig",
    "LLMConfig",
    "MetricsConfig",
    "Policy",
    "ServerConfig",
    "StoreConfig",
    "StreamConfig",
    "Tenant",
    "check_reload",
    "load_config",
    "parse_policy",
]

# Chosen with `tierguard eval --cross-source --groups 5` on ../shared/datasets: the median,
# over held-out groups of sources, of the lowest threshold escalating at most 3% of the
# other groups' ordinary benign (see README, "Tuning thresholds").
DEFAULT_ESCALATE_AT = 0.82
DEFAULT_BLOCK_AT = 0.97


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field at fault."""


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
        stream_mode: How CheckStream releases an answer when the caller does
            not say: hold_back, stream_first or audit.
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
    stream_mode: StreamMode = StreamMode.HOLD_BACK

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
        max_checks_per_caller: Checks one caller (its API key, else its peer
            address) may have in flight; beyond it that caller gets
            RESOURCE_EXHAUSTED while others go on. 0: no per-caller cap.
        grace_seconds: How long a stopping server lets checks in flight finish.
        require_api_key: Whether check calls need a tenant API key (or an
            admin token) in `authorization: Bearer <key>`.
        tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS.
        tls_key_file: PEM private key of the certificate.
        tls_client_ca_file: PEM CA bundle; when set, clients must present a
            certificate it signed (mutual TLS).
        workers: Processes serving the port (1 to 64; `serve --workers`), each
            with its own index; more than one needs a PostgreSQL `store.url`.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_text_chars: int = 20_000
    max_concurrent_checks: int = 512
    max_checks_per_caller: int = 0
    grace_seconds: float = 5.0
    require_api_key: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    workers: int = 1


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
        max_batch_chars: Most characters in one call (a longer text goes alone);
            waiting texts go shortest first, so a flood of long texts delays
            a short prompt by one call at most.
        max_skipped_calls: Calls a waiting text may be passed over by shorter
            ones before it goes first (no text starves).
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
    max_batch_chars: int = 8_192
    max_skipped_calls: int = 4
    max_wait_ms: float = 0.0
    cache_size: int = 10_000
    route_cache_size: int = 10_000


@dataclass(frozen=True)
class LLMConfig(LLMSettings):
    """An OpenAI-compatible model endpoint (the critic's, or the upstream generator's).

    Every `critic.chat.LLMSettings` field is a setting of this section, by
    inheritance: the critic package owns the list, so a field added there can
    be set from the file without being written twice. Only what the critic
    package has no use for is added here.

    Attributes:
        enabled: True or False forces it; None (default) turns it on when an
            endpoint or key is configured here or in OPENAI_BASE_URL / OPENAI_API_KEY.
        system_prompt: The generator's system prompt (ignored for the critic).
    """

    enabled: bool | None = None
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
        """The critic package's settings for this endpoint, the SDK's environment filled in."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LLMSettings)}
        api_key = self.api_key or environ.get("OPENAI_API_KEY") or None
        base_url = self.base_url or environ.get("OPENAI_BASE_URL") or None
        values |= {"base_url": base_url, "api_key": api_key or ("unused" if base_url else None)}
        return LLMSettings(**values)


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
class ConversationConfig:
    """How CheckConversation reads conversations and keeps sessions.

    Attributes:
        max_messages: Most messages in one call.
        max_segments: Most segments of one tool result or document scored on
            their own (a longer one is cut into this many).
        session_turns: Recent user turns read together (the session's, or the
            conversation's when the call names no session), so an attack split
            over turns that each look mild is still seen whole.
        session_decay: Share of a session's earlier risk kept per turn, in [0, 1]:
            after a turn at risk r, the next turns are escalated while
            r x decay^n is at or above the policy's escalate_at (with 0.9 and
            the default 0.82, the turn after a blocked one).
        session_ttl_s: A session unused this long is forgotten.
        max_sessions: Sessions kept in memory; beyond it the least recently used goes.
        data_score_margin: A tool result's or document's segment escalates on
            its embedding score alone only from this far between the policy's
            escalate_at (0) and block_at (1); instructions addressed to the
            assistant and prefilter rules escalate it whatever the score.
    """

    max_messages: int = 200
    max_segments: int = 24
    session_turns: int = 4
    session_decay: float = 0.9
    session_ttl_s: float = 1800.0
    max_sessions: int = 10_000
    data_score_margin: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.session_decay <= 1.0:
            raise ValueError("session_decay: must be in [0, 1]")
        if not 0.0 <= self.data_score_margin <= 1.0:
            raise ValueError("data_score_margin: must be in [0, 1]")
        for name in ("max_messages", "max_segments", "session_turns", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")


@dataclass(frozen=True)
class StreamConfig:
    """How CheckStream windows an answer.

    Attributes:
        window_chars: New characters after which a window is checked by the
            embedding tier (and the critic, if the window is risky); the
            detectors run on every chunk.
        overlap_chars: Characters carried over into the next check, and in
            `hold_back` held back until more text follows, so that a secret
            or a schema split across chunks is seen whole.
        max_chars: Longest answer one stream may carry.
    """

    window_chars: int = 512
    overlap_chars: int = 128
    max_chars: int = 400_000

    def __post_init__(self) -> None:
        if self.window_chars < 1 or self.max_chars < 1:
            raise ValueError("window_chars and max_chars: must be at least 1")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint.

    Attributes:
        port: Port of `/metrics` (Prometheus text format), on the gateway's
            host; None (default): no endpoint. 0 picks a free port.
    """

    port: int | None = None


@dataclass(frozen=True)
class StoreConfig:
    """Where exemplars, policy changes, the audit log, critic records and decisions are kept.

    Attributes:
        url: A PostgreSQL URL (`postgresql://user[:password]@host[:port]/dbname`,
            libpq parameters such as `?sslmode=require` allowed) to share one
            database between gateways; None (default): SQLite files in `data_dir`.
        pool_size: Most connections one gateway opens to PostgreSQL.
        poll_s: PostgreSQL: seconds between the checks a gateway makes of the
            store for changes made through other gateways, besides the
            notifications that announce them (a safety net for a lost one).
        decision_retention_days: The decision log (and its per-minute counts)
            keeps this many days; older lines are deleted as new ones are
            written. 0 keeps everything. Exemplars, their history, the audit
            log and critic records are never deleted.
    """

    url: str | None = None
    pool_size: int = 10
    poll_s: float = 5.0
    decision_retention_days: float = 30.0

    def __post_init__(self) -> None:
        if self.poll_s <= 0:
            raise ValueError("poll_s: must be positive")
        if not 0 <= self.decision_retention_days < 1e6:
            raise ValueError("decision_retention_days: must be 0 (keep all) or a number of days")


@dataclass(frozen=True)
class Config:
    """Everything the gateway needs to start."""

    server: ServerConfig = field(default_factory=ServerConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    index: IndexOptions = field(default_factory=IndexOptions)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
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
        if self.store.url is not None and not is_postgres_url(self.store.url):
            raise ConfigError(f"store.url: {_not_a_store_url(self.store.url)}")

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
    "TIERGUARD_METRICS_PORT": ("metrics", "port"),
    "TIERGUARD_STORE_URL": ("store", "url"),
}

# Whole numbers end up in C ints (gRPC options, ONNX Runtime, FAISS).
_INT_MAX = 2**31 - 1
# Tighter bounds, by a field's own name. A check request carries two texts of up to
# 4 UTF-8 bytes a character, and gRPC refuses messages of 2 GiB and more.
_INT_LIMITS = {"port": 65_535, "max_text_chars": 100_000_000, "workers": 64}
# 0 would never encode anything, or never connect, or never serve.
_INT_MINIMA = {"max_batch": 1, "max_batch_chars": 1, "pool_size": 1, "workers": 1}


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a Config from defaults, a YAML file, the environment and overrides.

    A file that is empty (or only whitespace and comments) is an error, not
    "the defaults": whoever names a config file means it to be used, and on
    SIGHUP such a file is a truncated or half-saved one.

    Args:
        path: YAML file; None falls back to `TIERGUARD_CONFIG`, then to no file.
        environ: The environment to read (default: os.environ).
        overrides: Dotted keys to values, e.g. {"server.port": 50052}, as the CLI sets them.

    Raises:
        ConfigError: the file is missing, unreadable, empty or malformed, or a
            value is invalid. One line naming the field and where it was set
            (the file, an environment variable or the command line).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}  # dotted field -> where it was set, if not in the file
    path = path or (Path(env["TIERGUARD_CONFIG"]) if env.get("TIERGUARD_CONFIG") else None)
    if path is not None:
        raw = _read_yaml(Path(path))
        raw["source"] = str(path)
    try:
        for variable, keys in _ENV.items():
            if env.get(variable):
                _node(raw, keys[:-1])[keys[-1]] = env[variable]
                origins[".".join(keys)] = f"environment variable {variable}"
        for dotted, value in (overrides or {}).items():
            if value is not None:
                keys = tuple(dotted.split("."))
                _node(raw, keys[:-1])[keys[-1]] = value
                origins[dotted] = "command line"
        if env.get("TIERGUARD_ADMIN_TOKENS"):
            _add_admin_tokens(raw, env["TIERGUARD_ADMIN_TOKENS"], origins)
        return _parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(_blame(str(exc), origins, path)) from None


def check_reload(running: Config, new: Config) -> None:
    """Refuse a re-read config that would weaken or drop authentication unnoticed.

    SIGHUP re-reads a file while people edit it: a half-saved file can parse
    and still have lost its `server:` or `tenants:` block. Turning API keys
    off, or removing every tenant or every admin token, is therefore not done
    by a reload; restarting the gateway with the new file does it.

    Raises:
        ConfigError: `new` may not replace `running`; the message says why.
    """
    restart = "restart the gateway to do that"
    if running.server.require_api_key and not new.server.require_api_key:
        raise ConfigError(f"server.require_api_key: a reload cannot turn it off; {restart}")
    if running.tenants and not new.tenants:
        raise ConfigError(
            f"tenants: the file names none, the running config {len(running.tenants)}; "
            f"a reload cannot remove every tenant; {restart}"
        )
    if running.admin_tokens and not new.admin_tokens:
        raise ConfigError(
            f"admin.tokens: the file has none, the running config {len(running.admin_tokens)}; "
            f"a reload cannot remove every admin token; {restart}"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping.

    PyYAML keeps the last one silently: a second `server:` block would drop
    the first one's `require_api_key` without a word.
    """


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
            continue
        key = loader.construct_object(key_node)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found {key!r} twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
    yield from loader.construct_yaml_map(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; an unreadable, empty or non-mapping file is an error."""
    where = f"config file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    empty = ConfigError(
        f"{where} has no settings (it is empty or only comments); "
        "to run on the defaults, give no config file"
    )
    if not text.strip():
        raise empty
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where} is not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of thousands of digits
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if doc is None:
        raise empty
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of settings, not {_kind(doc)}")
    return doc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return f"{exc.problem}" + (
            f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        )
    return " ".join(str(exc).split())


def _node(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The mapping at `keys` in `raw`, created where missing or left empty."""
    node = raw
    for depth, key in enumerate(keys):
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"{where}: must be a mapping, not {_kind(node[key])}")
        node = node[key]
    return node


def _add_admin_tokens(raw: dict[str, Any], variable: str, origins: dict[str, str]) -> None:
    """Append TIERGUARD_ADMIN_TOKENS (comma-separated) to the file's `admin.tokens`."""
    admin = _node(raw, ("admin",))
    if admin.get("tokens") is None:
        admin["tokens"] = []
    if isinstance(admin["tokens"], list):  # else the parser names admin.tokens
        listed = admin["tokens"]
        for token in (t.strip() for t in variable.split(",")):
            if token:
                origins[f"admin.tokens[{len(listed)}]"] = (
                    "environment variable TIERGUARD_ADMIN_TOKENS"
                )
                listed.append(token)


def _blame(message: str, origins: Mapping[str, str], path: Path | None) -> str:
    """`message` prefixed with where its field was set: a variable, the command line, the file."""
    field_name = message.split(":", 1)[0]
    if field_name in origins:
        return f"{origins[field_name]}: {message}"
    return f"config file {path}: {message}" if path is not None else message


def _parse_config(raw: Mapping[Any, Any]) -> Config:
    top = {f.name: f for f in dataclasses.fields(Config)}
    _reject_unknown("", raw, set(top) - {"admin_tokens"} | {"admin"})
    policies = {
        name: parse_policy(name, {} if body is None else body)
        for name, body in _named("policies", _mapping("policies", raw.get("policies")))
    } or {"default": Policy()}
    return Config(
        server=_parse_section("server", ServerConfig, raw.get("server")),
        embedding=_parse_section("embedding", EmbeddingConfig, raw.get("embedding")),
        index=_parse_section("index", IndexOptions, raw.get("index")),
        conversation=_parse_section("conversation", ConversationConfig, raw.get("conversation")),
        stream=_parse_section("stream", StreamConfig, raw.get("stream")),
        metrics=_parse_section("metrics", MetricsConfig, raw.get("metrics")),
        store=_parse_section("store", StoreConfig, raw.get("store")),
        critic=_parse_section("critic", LLMConfig, raw.get("critic")),
        generator=_parse_section(
            "generator",
            LLMConfig,
            {"enabled": False, **_mapping("generator", raw.get("generator"))},
        ),
        data_dir=_coerce("data_dir", top["data_dir"], raw.get("data_dir", Config.data_dir)),
        default_policy=_coerce(
            "default_policy", top["default_policy"], raw.get("default_policy", "default")
        ),
        policies=policies,
        scoring_model=_coerce("scoring_model", top["scoring_model"], raw.get("scoring_model")),
        admin_tokens=_parse_admin_tokens(_mapping("admin", raw.get("admin"))),
        tenants=_parse_tenants(_mapping("tenants", raw.get("tenants"))),
        source=_coerce("source", top["source"], raw.get("source")),
    )


def _not_a_store_url(url: str) -> str:
    """Why `url` cannot be the store, without repeating what may hold a password."""
    scheme, found, _ = url.partition("://")
    given = f"a {scheme}:// URL" if found and scheme else "text without a scheme"
    if not url.strip():
        given = "empty text"
    return (
        f"must be a postgresql:// URL (postgresql://user@host:5432/dbname), or left out "
        f"for SQLite files in data_dir; got {given}"
    )


def _mapping(where: str, value: Any) -> Mapping[Any, Any]:
    """A section's body: a mapping, or {} when the section is left empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping, not {_kind(value)}")
    return value


def _named(where: str, body: Mapping[Any, Any]) -> list[tuple[str, Any]]:
    """The entries of a mapping keyed by names (policies, tenants): names are text."""
    for key in body:
        if not isinstance(key, str):
            raise ConfigError(f"{where}.{key}: names must be text: quote it ('{key}')")
        if not key.strip():
            raise ConfigError(f"{where}: a name cannot be empty")
    return list(body.items())


def _parse_admin_tokens(admin: Mapping[Any, Any]) -> dict[str, str]:
    """Admin credentials by name: `tokens` lists strings or {name, token} mappings.

    A bare token is named by a fingerprint of itself, so logs and the audit
    log can say who acted without ever holding the token.
    """
    _reject_unknown("admin", admin, {"tokens"})
    listed = [] if admin.get("tokens") is None else admin["tokens"]
    if not isinstance(listed, list):
        raise ConfigError(f"admin.tokens: must be a list of tokens, not {_kind(listed)}")
    tokens: dict[str, str] = {}
    for i, entry in enumerate(listed):
        where = f"admin.tokens[{i}]"
        if isinstance(entry, str) and entry:
            name, token = "admin-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
        elif (
            isinstance(entry, Mapping)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("token"), str)
            and entry["name"]
        ):
            _reject_unknown(where, entry, {"name", "token"})
            name, token = entry["name"], entry["token"]
        else:
            raise ConfigError(f"{where}: must be a token or {{name, token}}")
        if len(token) < 16:
            raise ConfigError(f"{where}: tokens must be at least 16 characters")
        tokens[name] = token
    return tokens


def _parse_tenants(raw: Mapping[Any, Any]) -> dict[str, Tenant]:
    tenants = {}
    for name, value in _named("tenants", raw):
        where = f"tenants.{name}"
        body = _mapping(where, value)
        _reject_unknown(where, body, {"api_keys", "policy", "allowed_policies"})
        keys = body.get("api_keys")
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and len(k) >= 16 for k in keys)
        ):
            raise ConfigError(f"{where}.api_keys: a list of keys of at least 16 characters")
        policy = body.get("policy") or "default"
        if not isinstance(policy, str):
            raise ConfigError(f"{where}.policy: must be a policy name, not {_kind(policy)}")
        allowed = body.get("allowed_policies") or [policy]
        if not isinstance(allowed, list) or not all(isinstance(p, str) for p in allowed):
            raise ConfigError(f"{where}.allowed_policies: must be a list of policy names")
        tenants[name] = Tenant(name, tuple(keys), policy, tuple(allowed))
    return tenants


def parse_policy(name: str, body: Mapping[str, Any]) -> Policy:
    """A validated policy from plain values; errors name `policies.<name>.<field>`."""
    where = f"policies.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be a mapping, not {_kind(body)}")
    policy: Policy = _parse_section(where, Policy, {**body, "name": name})
    try:
        policy.thresholds  # noqa: B018 - validates the pair
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return policy


def _reject_unknown(where: str, body: Mapping[Any, Any], known: set[str]) -> None:
    unknown = sorted((key for key in body if key not in known), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})"
        )


def _parse_section(where: str, cls: type, body: Any) -> Any:
    body = _mapping(where, body)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(where, body, set(fields))
    values = {key: _coerce(f"{where}.{key}", fields[key], value) for key, value in body.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a check across fields, or a value the type cannot take
        raise ConfigError(f"{where}: {exc}") from None


_ENUMS: dict[str, type[enum.Enum]] = {
    "CriticMode": CriticMode,
    "StreamMode": StreamMode,
    "FailMode": FailMode,
    "EmbeddingBackend": EmbeddingBackend,
}


def _coerce(where: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """`value` as the field's type, or a ConfigError naming `where`.

    Strict about types (a list is not a model name, `true` is not a number),
    lenient about text: environment variables and flags arrive as strings.
    """
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    if value is None or (kind == "Path" and value == ""):
        if optional:
            return None
        raise ConfigError(f"{where}: needs a value")
    try:
        if kind == "float":
            number = _to_float(value)
            if where.endswith(("escalate_at", "block_at")) and not 0.0 <= number <= 1.0:
                raise ValueError("must be in [0, 1]")
            if number < 0:
                raise ValueError("must not be negative")
            return number
        if kind == "int":
            whole = _to_int(value)
            name = where.rsplit(".", 1)[-1]
            low, high = _INT_MINIMA.get(name, 0), _INT_LIMITS.get(name, _INT_MAX)
            if not low <= whole <= high:
                raise ValueError(f"must be between {low} and {high}")
            return whole
        if kind == "bool":
            return _to_bool(value)
        if kind in _ENUMS:
            return _to_enum(_ENUMS[kind], value)
        if kind == "Path":
            return _to_path(value)
        if kind == "str":
            return _to_text(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}: invalid value {_shown(where, value)} ({exc})") from None
    raise TypeError(f"{where}: no parser for the type {kind!r}")  # a field type added here


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number, not {_kind(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
    if isinstance(value, float):
        if not value.is_integer():  # also nan and inf
            raise ValueError("must be a whole number")
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"must be a whole number, not {_kind(value)}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError("must be true or false")


def _to_enum(enum_type: type[enum.Enum], value: Any) -> enum.Enum:
    choices = " or ".join(repr(m.value) for m in enum_type)
    if value is False and "off" in {m.value for m in enum_type}:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    if not isinstance(value, str):
        raise ValueError(f"must be {choices}")
    try:
        return enum_type(value.strip().lower())
    except ValueError:
        raise ValueError(f"must be {choices}") from None


def _to_path(value: Any) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a path, not {_kind(value)}")
    return Path(value)


def _to_text(value: Any) -> str:
    if not isinstance(value, str):
        hint = "" if isinstance(value, Mapping | list) else " (quote it)"
        raise ValueError(f"must be text, not {_kind(value)}{hint}")
    return value


def _kind(value: Any) -> str:
    """What YAML made of a value, in the file's words."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text" if value else "empty text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple | set):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _shown(where: str, value: Any) -> str:
    """`value` for an error message: short, and never a secret."""
    if any(word in where.rsplit(".", 1)[-1] for word in ("key", "token")):
        return "(not shown)"
    if where.endswith(".url") and isinstance(value, str) and "://" in value:
        return repr(describe_url(value))  # a URL's password is never shown
    return _REPR.repr(value)
