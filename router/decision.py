"""Routing decisions: a risk score and a policy's thresholds in, a route out. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embeddings_index.vocabulary import Decision, Route, Tier
from router.prefilter import PrefilterHit, RuleAction

__all__ = ["Decision", "Route", "Thresholds", "Tier", "lowest_threshold_at_rate", "route_for"]


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
    compared with the thresholds (tier 1), and an escalating rule raises a text
    the score would allow to ESCALATE (tier 0 decided that).
    """
    if any(hit.action is RuleAction.BLOCK for hit in hits):
        return Route.BLOCK, Tier.PREFILTER
    if score >= thresholds.block_at:
        return Route.BLOCK, Tier.EMBEDDING
    if score >= thresholds.escalate_at:
        return Route.ESCALATE, Tier.EMBEDDING
    if any(hit.action is RuleAction.ESCALATE for hit in hits):
        return Route.ESCALATE, Tier.PREFILTER
    return Route.ALLOW, Tier.EMBEDDING


def lowest_threshold_at_rate(scores: Sequence[float] | np.ndarray, rate: float) -> float:
    """The lowest threshold t at which at most `rate` of `scores` reach it (score >= t).

    The one rule for "escalate at most X% of benign": calibration, the
    cross-source evaluation and the offline tools all choose thresholds with it.
    No scores: 0.0. A rate of 1 or more: the lowest score (everything reaches it).
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if not len(ordered):
        return 0.0
    allowed = int(np.floor(rate * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))  # just above the first score not allowed
