"""Traffic counters since start: requests, decisions by tier, escalations, fail-mode answers."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

__all__ = ["PolicyCounters", "TrafficStats"]


@dataclass
class PolicyCounters:
    """Counters of one policy."""

    requests: int = 0
    escalated: int = 0
    fallbacks: int = 0
    decisions: Counter[str] = field(default_factory=Counter)

    @property
    def escalation_rate(self) -> float:
        """Share of requests escalated to the critic tier."""
        return self.escalated / self.requests if self.requests else 0.0


class TrafficStats:
    """Counts every verdict by policy; read by GetStats. Updated on the event loop only."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.policies: defaultdict[str, PolicyCounters] = defaultdict(PolicyCounters)

    def count(
        self, policy: str, *, tier: str, decision: str, escalated: bool, fallback: bool
    ) -> None:
        """Count one verdict."""
        counters = self.policies[policy]
        counters.requests += 1
        counters.escalated += escalated
        counters.fallbacks += fallback
        counters.decisions[f"{tier}/{decision}"] += 1

    @property
    def uptime_s(self) -> float:
        """Seconds since start."""
        return time.monotonic() - self.started
