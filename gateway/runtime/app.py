"""The gateway's runtime parts, wired once at start and shared by every request.

`Gateway.create` loads the embedding model (unless one is passed in, as tests
do to load it once per session), opens the stores (exemplars, admin state,
critic records, decision log: SQLite files under the data directory, or the
PostgreSQL database of `store.url`), brings in the starter pack, builds the
index, loads the constitutions and picks the critic: the LLM critic when an
endpoint is configured, else the local critic. On PostgreSQL it also starts a
`StoreFollower`, so that changes made through other gateways on the same
database reach this one's index and policies. It knows nothing of gRPC: the
servicers adapt it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Tracer, TracerProvider

from critic.constitution import Constitution, load_constitutions
from critic.generator import Generator
from critic.llm_critic import LLMCritic
from critic.local_critic import LocalCritic
from critic.records import CriticRecords
from critic.types import Critic
from embeddings_index.batching import BatchingConfig, MicroBatcher
from embeddings_index.database import Storage
from embeddings_index.embedder import Embedder
from embeddings_index.lru import LRUCache
from embeddings_index.manager import IndexManager
from embeddings_index.store import ExemplarStore
from gateway.runtime.admin_state import AdminState
from gateway.runtime.auth import Credentials, Principal, Role
from gateway.runtime.config import Config, ConversationConfig, Policy
from gateway.runtime.decision_log import DecisionLog
from gateway.runtime.embedding import make_embedder
from gateway.runtime.errors import PermissionDenied, PolicyNotFound
from gateway.runtime.follower import StoreFollower
from gateway.runtime.metrics import Metrics
from gateway.runtime.policies import PolicyRegistry
from gateway.runtime.sessions import SessionStore
from gateway.runtime.stats import TrafficStats
from gateway.runtime.tracing import tracer_for
from router.normalize import NormalizationLimits, TextRejected, normalize, normalized_text
from router.prefilter import Prefilter, RuleAction
from router.router import Router, RouteResult
from router.scoring import DEFAULT_MODEL_PATH, ScoringModel

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Config, index, router, critic and records of one running gateway."""

    config: Config
    embedder: Embedder
    index: IndexManager
    router: Router
    prefilter: Prefilter
    batcher: MicroBatcher
    constitutions: Mapping[str, Constitution]
    critic: Critic
    local_critic: LocalCritic
    records: CriticRecords
    admin_state: AdminState
    policies: PolicyRegistry
    credentials: Credentials
    decisions: DecisionLog
    stats: TrafficStats = field(default_factory=TrafficStats)
    route_cache: LRUCache[tuple[Any, ...], RouteResult] = field(default_factory=lambda: LRUCache(0))
    generator: Generator | None = None
    tier0_executor: ThreadPoolExecutor | None = None
    sessions: SessionStore = field(default_factory=lambda: _sessions(ConversationConfig()))
    metrics: Metrics = field(default_factory=Metrics)
    tracer_provider: TracerProvider | None = None
    follower: StoreFollower | None = None  # PostgreSQL: follows other gateways' changes
    tracer: Tracer = field(init=False)  # from tracer_provider
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tracer = tracer_for(self.tracer_provider)

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        embedder: Embedder | None = None,
        environ: Mapping[str, str] | None = None,
        tracer_provider: TracerProvider | None = None,
        worker: int | None = None,
    ) -> Gateway:
        """Build every part; slow (loads the model, may embed the starter pack).

        `tracer_provider` records the gateway's spans (None: the global provider,
        which records nothing unless `tracing.configure_from_environment` set one).
        `worker`: this process is that worker of `serve --workers` (its metrics
        are then written for the supervisor's `/metrics`; see `Metrics`).

        Raises:
            ConfigError: a policy names a constitution that does not exist.
            DatabaseError: the store cannot be opened (PostgreSQL unreachable, a
                file that cannot be written, a schema newer than this code).
        """
        env = os.environ if environ is None else environ
        constitutions = load_constitutions()
        storage = Storage(config.store.url, config.data_dir, pool_size=config.store.pool_size)
        admin_state = AdminState(storage.open("admin"))  # first: a bad store fails fast
        try:
            policies = PolicyRegistry(config, admin_state, constitutions)
            if embedder is None:
                embedder = make_embedder(config)
            # Normalisation is bounded by the raw text limit the server was started with.
            limits = NormalizationLimits.for_raw_limit(config.server.max_text_chars)
            index = IndexManager.open(
                config.data_dir,
                embedder,
                prepare=functools.partial(normalized_text, limits=limits),
                index_options=config.index,
                snapshot_dir=config.data_dir / "index",
                store=ExemplarStore(storage.open("exemplars", timeout_s=30.0)),
            )
            records = CriticRecords(storage.open("critic"))
            decisions = DecisionLog(
                storage.open("decisions", durable=False),
                retention_days=config.store.decision_retention_days,
            )
        except BaseException:
            storage.close()  # PostgreSQL: the pool's connections and threads
            admin_state.close()
            raise
        prefilter = Prefilter.from_directory()
        tier0 = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tier0")
        router = Router(
            prefilter=prefilter,
            scoring=ScoringModel.load(config.scoring_model or DEFAULT_MODEL_PATH),
            index=lambda: index.index,
            executor=tier0,
            limits=limits,
        )
        batcher = MicroBatcher(
            embedder,
            BatchingConfig(
                max_batch=config.embedding.max_batch,
                max_batch_chars=config.embedding.max_batch_chars,
                max_skipped_calls=config.embedding.max_skipped_calls,
                max_wait_ms=config.embedding.max_wait_ms,
                cache_size=config.embedding.cache_size,
            ),
        )
        local = LocalCritic()
        critic: Critic = (
            LLMCritic(config.critic.settings(env)) if config.critic.is_enabled(env) else local
        )
        generator = (
            Generator(config.generator.settings(env), system_prompt=config.generator.system_prompt)
            if config.generator.is_enabled(env)
            else None
        )
        log.info(
            "gateway ready: %d exemplars (index version %d, store %s), policies %s, critic %s%s, "
            "generator %s",
            len(index.index),
            index.index.version,
            storage.description,
            sorted(config.policies),
            critic.kind.value,
            f" ({critic.model})" if critic.model else "",
            generator.model if generator else "not configured",
        )
        gateway = cls(
            config=config,
            embedder=embedder,
            index=index,
            router=router,
            prefilter=prefilter,
            batcher=batcher,
            constitutions=constitutions,
            critic=critic,
            local_critic=local,
            records=records,
            admin_state=admin_state,
            policies=policies,
            credentials=Credentials(config),
            decisions=decisions,
            generator=generator,
            tier0_executor=tier0,
            route_cache=LRUCache(config.embedding.route_cache_size),
            sessions=_sessions(config.conversation),
            tracer_provider=tracer_provider,
            metrics=Metrics(worker=worker),
        )
        if config.store.url is not None:  # SQLite: one process per data dir, nothing to follow
            gateway.follower = StoreFollower(
                config.store.url,
                index,
                policies,
                metrics=gateway.metrics,
                poll_s=config.store.poll_s,
            )
            gateway.follower.start()
        gateway.metrics.watch(gateway)
        return gateway

    def resolve_policy(self, *names: str, principal: Principal | None = None) -> Policy:
        """The first non-empty name's policy, else the caller's (a tenant's) or the default.

        Raises:
            PolicyNotFound: the first non-empty name is not a policy.
            PermissionDenied: a tenant named a policy it may not use.
        """
        tenant = principal if principal is not None and principal.role is Role.TENANT else None
        fallback = tenant.policy if tenant else self.policies.default_name
        name = next((n for n in names if n), fallback)
        policy = self.policies.get(name)
        if policy is None:
            raise PolicyNotFound(name)
        if tenant and name not in tenant.allowed_policies:
            raise PermissionDenied(
                f"tenant {tenant.name!r} may not use policy {name!r}; "
                f"allowed: {', '.join(tenant.allowed_policies)}"
            )
        return policy

    def reload(self, config: Config) -> None:
        """Take a re-read config: policies, tenants and admin tokens (listeners stay as they are).

        Raises:
            ConfigError: the new config is invalid; the old one stays in force.
        """
        self.policies.load(config)
        self.credentials = Credentials(config)
        self.config = config

    def constitution(self, policy: Policy) -> Constitution:
        """The constitution `policy` names (validated at start)."""
        return self.constitutions[policy.constitution]

    def blocking_prefilter_rules(self, text: str) -> list[str]:
        """Ids of blocking prefilter rules that match `text` (re-checks critic revisions)."""
        try:
            hits = self.prefilter.scan(normalize(text, limits=self.router.limits))
        except TextRejected:  # a revision that expands past the limits is not let out
            return ["prefilter.normalization_refused"]
        return [f"prefilter.{h.rule_id}" for h in hits if h.action is RuleAction.BLOCK]

    def in_background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run `coroutine` after the response (shadow critic, records); errors are logged."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def aclose(self, *, timeout_s: float = 5.0) -> None:
        """Let background work finish (bounded), then release threads, clients and files."""
        self.metrics.close()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)
        await self.batcher.aclose()
        if self.tier0_executor is not None:
            self.tier0_executor.shutdown(wait=False, cancel_futures=True)
        if isinstance(self.critic, LLMCritic):
            await self.critic.aclose()
        if self.generator is not None:
            await self.generator.aclose()
        self.index.store.close()
        self.records.close()
        self.decisions.close()
        self.admin_state.close()


def _sessions(settings: ConversationConfig) -> SessionStore:
    return SessionStore(
        max_sessions=settings.max_sessions,
        ttl_s=settings.session_ttl_s,
        turns_kept=settings.session_turns,
        decay=settings.session_decay,
    )
