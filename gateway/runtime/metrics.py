"""Prometheus metrics: what platform teams put on dashboards and alerts.

Counters and histograms are updated as verdicts are given; the state that is
cheaper to read than to track (index size and version, the critic's circuit,
sessions, escalation rate against budget) is read when Prometheus scrapes.
Every series lives on the gateway's own registry, served on its own HTTP
port (`metrics.port`), never on the gRPC port.

With `serve --workers N` the workers are separate processes, and one scrape
must see them all: each worker runs prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor, which serves the one
`/metrics` and sums the workers' files). Counters and histograms keep their
names and labels and are summed over the workers. The scrape-time state
cannot be read from another process, so each worker copies it into gauges
every `STATE_SAMPLE_S` (`Metrics.start_sampling`): per worker with a `worker`
label (index, follower, circuit, sessions), or once for the fleet (escalation
rate and budget, which every worker reads from the same store). A worker's
`tierguard_worker_checks_total{worker}` shows which workers answer.

Labels never carry texts, tokens or request ids (unbounded values would
explode the series count); tenant names are bounded by the config.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from embeddings_index.database import DatabaseError

if TYPE_CHECKING:
    from gateway.runtime.app import Gateway
    from gateway.runtime.pipeline import CheckResult

__all__ = ["STATE_SAMPLE_S", "Metrics", "MetricsServer", "serve_fleet_metrics", "serve_metrics"]

log = logging.getLogger(__name__)

# How often a worker of `serve --workers` copies its scrape-time state into gauges.
STATE_SAMPLE_S = 1.0

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """The gateway's series on a registry of its own (tests and several gateways in one
    process never collide).

    `worker`: this process is worker `worker` of `serve --workers` (prometheus_client
    is then in multiprocess mode, see the module docstring); None: a lone gateway.
    """

    def __init__(self, *, worker: int | None = None) -> None:
        self.worker = worker
        self._sampled: dict[str, Gauge] = {}
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "tierguard_decisions_total", "Verdicts given, by RPC, policy, tier and decision.",
            ["rpc", "policy", "tier", "decision"], registry=r,
        )  # fmt: skip
        self.escalations = Counter(
            "tierguard_escalations_total", "Checks sent to the critic tier, by policy.",
            ["policy"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "tierguard_fallbacks_total",
            "Verdicts the policy's fail mode gave because the critic could not judge, by reason.",
            ["policy", "reason"], registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "tierguard_stage_duration_seconds", "Time per stage of a check.", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "tierguard_requests_total", "Calls answered, by RPC and gRPC status code.",
            ["rpc", "code"], registry=r,
        )  # fmt: skip
        self.overload = Counter(
            "tierguard_overload_rejections_total",
            "Checks refused with RESOURCE_EXHAUSTED, by scope (server or caller).",
            ["scope"], registry=r,
        )  # fmt: skip
        self.critic_calls = Counter(
            "tierguard_critic_calls_total", "Calls to the critic's model, by critic kind.",
            ["critic"], registry=r,
        )  # fmt: skip
        self.critic_tokens = Counter(
            "tierguard_critic_tokens_total", "Tokens the critic's model used, by kind.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.critic_cost = Counter(
            "tierguard_critic_cost_usd_total", "The critic's model cost in US dollars.",
            registry=r,
        )  # fmt: skip
        self.streams = Gauge(
            "tierguard_streams_in_flight", "CheckStream and GenerateStream calls open.",
            registry=r, multiprocess_mode="livesum",  # workers: the sum over live ones
        )  # fmt: skip
        self.follower_applies = Counter(
            "tierguard_follower_applies_total",
            "Changes of the shared store this replica took in, by kind (incremental, rebuild, "
            "policies).",
            ["kind"], registry=r,
        )  # fmt: skip
        self.follower_errors = Counter(
            "tierguard_follower_errors_total",
            "Failures to listen to or read the shared store (each retried after a backoff).",
            registry=r,
        )  # fmt: skip

        self.worker_checks: Counter | None = None
        if worker is not None:
            self.worker_checks = Counter(
                "tierguard_worker_checks_total",
                "Verdicts given by each worker process of serve --workers.",
                ["worker"], registry=r,
            )  # fmt: skip

    def observe(self, rpc: str, result: CheckResult, total_s: float) -> None:
        """Count one verdict and its stages' times."""
        if self.worker_checks is not None:
            self.worker_checks.labels(str(self.worker)).inc()
        policy = result.policy.name
        self.decisions.labels(rpc, policy, result.decided_by.value, result.decision.value).inc()
        if result.escalated:
            self.escalations.labels(policy).inc()
        if result.fail_reason:
            self.fallbacks.labels(policy, result.fail_reason).inc()
        for stage, ms in result.route.timings.stages():
            if ms > 0:
                self.stage_seconds.labels(stage).observe(ms / 1000.0)
        outcome = result.outcome
        if outcome is not None:
            self.stage_seconds.labels("critic").observe(outcome.critic_ms / 1000.0)
            usage = outcome.usage
            if usage.calls:
                self.critic_calls.labels(outcome.critic.value).inc(usage.calls)
                self.critic_tokens.labels("prompt").inc(usage.prompt_tokens)
                self.critic_tokens.labels("completion").inc(usage.completion_tokens)
                self.critic_cost.inc(usage.cost_usd)
        self.stage_seconds.labels("total").observe(total_s)

    def watch(self, gateway: Gateway) -> None:
        """Read the gateway's state at every scrape (a worker: sample it, see start_sampling)."""
        if self.worker is None:
            self.registry.register(_GatewayState(gateway))
        else:
            self.start_sampling(gateway)

    def start_sampling(self, gateway: Gateway, interval_s: float = STATE_SAMPLE_S) -> None:
        """Copy the scrape-time state into multiprocess gauges now and every `interval_s`."""
        self.sample(gateway)
        self._sampler = threading.Thread(
            target=self._sample_until_closed, args=(gateway, interval_s),
            name="tierguard-metrics-sampler", daemon=True,
        )  # fmt: skip
        self._sampler.start()

    def _sample_until_closed(self, gateway: Gateway, interval_s: float) -> None:
        while not self._sampling.wait(interval_s):
            try:
                self.sample(gateway)
            except Exception:  # a bug must not end the sampling for good
                log.exception("could not sample the gateway's state for /metrics")

    def sample(self, gateway: Gateway) -> None:
        """Set this worker's state gauges (see the module docstring)."""
        worker = str(self.worker)
        for state in gateway_state(gateway):
            gauge = self._sampled.get(state.name)
            labels = dict(state.labels)
            if state.per_worker:
                labels["worker"] = worker
            if gauge is None:
                gauge = self._sampled[state.name] = Gauge(
                    state.name, state.documentation, sorted(labels), registry=self.registry,
                    multiprocess_mode="livemax",  # the live workers' value (or the fleet's)
                )  # fmt: skip
            (gauge.labels(**labels) if labels else gauge).set(state.value)

    def close(self) -> None:
        """Stop sampling (a worker)."""
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)


@dataclass(frozen=True)
class _State:
    """One gauge's value read from the gateway."""

    name: str
    documentation: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    per_worker: bool = True  # False: the fleet's figure, the same in every worker


def gateway_state(gateway: Gateway) -> Iterator[_State]:
    """The gauges read from the gateway rather than counted as verdicts are given."""
    index = gateway.index.index
    yield _State("tierguard_index_exemplars", "Exemplars in the serving index.", len(index))
    yield _State("tierguard_index_version", "Version of the serving index.", index.version)
    follower = gateway.follower
    if follower is not None:
        yield _State(
            "tierguard_follower_connected",
            "1 while this replica listens to the shared store for changes.",
            float(follower.connected.is_set()),
        )
    circuit = getattr(gateway.critic, "circuit_open", False)
    yield _State(
        "tierguard_critic_circuit_open", "1 while the critic's circuit breaker is open.",
        float(circuit),
    )  # fmt: skip
    yield _State("tierguard_sessions", "Conversation sessions kept.", len(gateway.sessions))
    try:  # the fleet's traffic of the last hour, as GetStats counts it
        traffic = gateway.decisions.traffic()
    except DatabaseError as exc:  # the store is away: no rate rather than a failed scrape
        log.warning("escalation rates left out of /metrics: %s", exc)
        traffic = {}
    for policy in gateway.policies.all():
        labels = (("policy", policy.name),)
        counters = traffic.get(policy.name)
        if counters is not None and counters.requests:
            yield _State(
                "tierguard_escalation_rate",
                "Share of a policy's checks sent to the critic over the last hour "
                "(every gateway on a shared store).",
                counters.escalation_rate, labels, per_worker=False,
            )  # fmt: skip
        yield _State(
            "tierguard_escalation_budget", "The share a policy may escalate (0: no budget).",
            policy.escalation_budget, labels, per_worker=False,
        )  # fmt: skip


class _GatewayState(Collector):
    """Gauges read from the gateway when scraped (a lone gateway)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for state in gateway_state(self._gateway):
            family = families.get(state.name)
            if family is None:
                family = families[state.name] = GaugeMetricFamily(
                    state.name, state.documentation, labels=[k for k, _ in state.labels]
                )
            family.add_metric([v for _, v in state.labels], state.value)
        yield from families.values()


@dataclass
class MetricsServer:
    """The `/metrics` HTTP listener (a daemon thread)."""

    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop listening and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve `metrics` in the Prometheus text format on http://host:port/metrics (port 0:
    a free one)."""
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(httpd.server_port, httpd, thread)


def serve_fleet_metrics(directory: Path, host: str, port: int) -> MetricsServer:
    """Serve the sum of the workers' series, written under `directory`, on one `/metrics`.

    For the supervisor of `serve --workers`, which runs no gateway itself.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd.server_port, httpd, thread)
