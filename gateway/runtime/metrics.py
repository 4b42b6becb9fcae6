"""Prometheus metrics: what platform teams put on dashboards and alerts.

Counters and histograms are updated as verdicts are given; the state that is
cheaper to read than to track (index size and version, the critic's circuit,
sessions, escalation rate against budget) is read when Prometheus scrapes.
Every series lives on the gateway's own registry, served on its own HTTP
port (`metrics.port`), never on the gRPC port.

One process only, for now: with several worker processes each would need
prometheus_client's multiprocess mode, which `serve --workers` does not have yet.
Labels never carry texts, tokens or request ids (unbounded values would
explode the series count); tenant names are bounded by the config.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.runtime.app import Gateway
    from gateway.runtime.pipeline import CheckResult

__all__ = ["Metrics", "MetricsServer", "serve_metrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """The gateway's series on a registry of its own (tests and several gateways in one
    process never collide)."""

    def __init__(self) -> None:
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
            registry=r,
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

    def observe(self, rpc: str, result: CheckResult, total_s: float) -> None:
        """Count one verdict and its stages' times."""
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
        """Read the gateway's state at every scrape."""
        self.registry.register(_GatewayState(gateway))


class _GatewayState(Collector):
    """Gauges read from the gateway when scraped."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gateway = self._gateway
        index = gateway.index.index
        yield _gauge("tierguard_index_exemplars", "Exemplars in the serving index.", len(index))
        yield _gauge("tierguard_index_version", "Version of the serving index.", index.version)
        follower = gateway.follower
        if follower is not None:
            yield _gauge(
                "tierguard_follower_connected",
                "1 while this replica listens to the shared store for changes.",
                float(follower.connected.is_set()),
            )
        circuit = getattr(gateway.critic, "circuit_open", False)
        yield _gauge(
            "tierguard_critic_circuit_open", "1 while the critic's circuit breaker is open.",
            float(circuit),
        )  # fmt: skip
        yield _gauge("tierguard_sessions", "Conversation sessions kept.", len(gateway.sessions))
        rate = GaugeMetricFamily(
            "tierguard_escalation_rate",
            "Share of a policy's checks sent to the critic since start.", labels=["policy"],
        )  # fmt: skip
        budget = GaugeMetricFamily(
            "tierguard_escalation_budget",
            "The share a policy may escalate (0: no budget).", labels=["policy"],
        )  # fmt: skip
        for policy in gateway.policies.all():
            counters = gateway.stats.policies.get(policy.name)
            if counters is not None and counters.requests:
                rate.add_metric([policy.name], counters.escalated / counters.requests)
            budget.add_metric([policy.name], policy.escalation_budget)
        yield rate
        yield budget


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


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
