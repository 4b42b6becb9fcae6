"""Traffic counters of a policy (read from the decision log) and the gateway's uptime.

The counts themselves are not kept in memory: a process's own counters would
show one gateway of a fleet (or one worker of `serve --workers`), while a
policy's escalation budget is the fleet's. `DecisionLog.traffic` sums them
from the store every gateway writes to.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["PolicyCounters", "TrafficStats"]


@dataclass
class PolicyCounters:
    """Counters of one policy."""

    requests: int = 0
    escalated: int = 0
    fallbacks: int = 0
    decisions: Counter[str] = field(default_factory=Counter)  # "tier/decision" -> count

    @property
    def escalation_rate(self) -> float:
        """Share of requests escalated to the critic tier."""
        return self.escalated / self.requests if self.requests else 0.0


class TrafficStats:
    """When this gateway process started (GetStats' uptime)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def uptime_s(self) -> float:
        """Seconds since start."""
        return time.monotonic() - self.started
