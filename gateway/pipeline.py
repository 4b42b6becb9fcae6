"""The check pipeline: router first, then (for escalated texts) the critic tier.

Until the critic tier exists, an escalated text gets its policy's fallback
decision, marked `fallback_applied` so that no one counts it as a judgement.
gRPC-free: the servicer adapts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.app import Gateway
from gateway.config import Policy
from router.decision import Decision, Route, Tier
from router.router import RouteResult

__all__ = ["CheckResult", "check_prompt"]

_ROUTE_DECISIONS = {Route.ALLOW: Decision.ALLOW, Route.BLOCK: Decision.BLOCK}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The final decision on a text, with the router's evidence."""

    decision: Decision
    decided_by: Tier
    route: RouteResult
    policy: Policy
    reason: str
    fallback_applied: bool = False
    critic_ms: float = 0.0

    @property
    def escalated(self) -> bool:
        """Whether the router sent the text on to the critic tier."""
        return self.route.route is Route.ESCALATE


async def check_prompt(gateway: Gateway, text: str, policy: Policy) -> CheckResult:
    """Route a user's prompt and decide it under `policy`."""
    routed = await gateway.router.route(
        text, thresholds=policy.thresholds, embed=gateway.batcher.embed, k=policy.k or None
    )
    if routed.route is not Route.ESCALATE:
        return CheckResult(
            _ROUTE_DECISIONS[routed.route], routed.decided_by, routed, policy, routed.reason
        )
    fallback = policy.fallback_decision
    return CheckResult(
        decision=fallback,
        decided_by=Tier.CRITIC,
        route=routed,
        policy=policy,
        reason=(
            f"{routed.reason}: escalated to the critic tier; no critic is available, so the "
            f"policy's fallback decision ({fallback.value}) applies"
        ),
        fallback_applied=True,
    )
