"""Routing decisions: a risk score and a policy's thresholds in, a route out. Pure."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from router.prefilter import PrefilterHit, RuleAction

__all__ = ["Decision", "Route", "Thresholds", "Tier", "route_for"]


class Decision(enum.Enum):
    """What the caller should do with a text."""

    ALLOW = "allow"
    BLOCK = "block"
    REVISE = "revise"


class Tier(enum.Enum):
    """The tier that made a decision, in the order a request meets them."""

    PREFILTER = "prefilter"
    EMBEDDING = "embedding"
    CRITIC = "critic"


class Route(enum.Enum):
    """Where the router sends a text."""

    ALLOW = "allow"
    ESCALATE = "escalate"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A policy's cut points on the risk score, both in [0, 1].

    Attributes:
        escalate_at: Scores at or above this go to the critic tier.
        block_at: Scores at or above this are blocked without the critic.
    """

    escalate_at: float
    block_at: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.escalate_at <= self.block_at <= 1.0:
            raise ValueError(
                "thresholds must satisfy 0 <= escalate_at <= block_at <= 1, "
                f"got escalate_at={self.escalate_at}, block_at={self.block_at}"
            )


def route_for(
    score: float, hits: Sequence[PrefilterHit], thresholds: Thresholds
) -> tuple[Route, Tier]:
    """The route for a scored text, and the tier that decided it.

    A blocking prefilter rule decides alone (tier 0); otherwise the score is
    compared with the thresholds (tier 1).
    """
    if any(hit.action is RuleAction.BLOCK for hit in hits):
        return Route.BLOCK, Tier.PREFILTER
    if score >= thresholds.block_at:
        return Route.BLOCK, Tier.EMBEDDING
    if score >= thresholds.escalate_at:
        return Route.ESCALATE, Tier.EMBEDDING
    return Route.ALLOW, Tier.EMBEDDING
