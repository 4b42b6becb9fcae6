"""The check pipelines: router first, the critic tier only where the risk is.

- `check_prompt`: route; an escalated prompt goes to the critic (sync), or is
  answered by the fail mode at once while the critic judges in the background
  (shadow), or by the fail mode alone (off).
- `check_response`: detectors run on every draft; the critique -> revise ->
  re-check loop runs only when the prompt's risk or a detector calls for it.
- `generate`: check the prompt, draft with the upstream model, check the draft.

Every critic judgement is recorded (the data flywheel), and the LLM critic's
verdicts on prompts become exemplar proposals that wait for an admin.
gRPC-free: the servicer adapts it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from critic.constitution import Constitution, Target
from critic.detectors import detect
from critic.loop import Outcome, judge_prompt, review_response
from critic.records import CriticRecord
from critic.types import Critic, CriticUnavailable, Deadline, Usage
from embeddings_index.store import Exemplar
from embeddings_index.vocabulary import (
    CriticKind,
    CriticMode,
    Decision,
    FailMode,
    Label,
    Route,
    Tier,
)
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from gateway.runtime.errors import FailedPrecondition, Unavailable
from gateway.runtime.tracing import add_stage_spans, now_ns, span
from router.router import RouteResult, Timings

__all__ = [
    "CheckResult", "GenerateResult", "check_prompt", "check_response", "generate",
    "generator_failed", "generator_not_configured", "record_outcome", "route",
]  # fmt: skip

_ROUTE_DECISIONS = {Route.ALLOW: Decision.ALLOW, Route.BLOCK: Decision.BLOCK}
_MODE_REASONS = {CriticMode.SHADOW: "shadow", CriticMode.OFF: "critic_off"}


@dataclass(frozen=True)
class CheckResult:
    """The final decision on a text, with the router's and the critic's evidence.

    Attributes:
        decision: ALLOW, REVISE or BLOCK.
        decided_by: The tier that decided.
        route: The router's result for the prompt.
        policy: The policy applied.
        constitution: The constitution applied.
        reason: One sentence that says why.
        escalated: Whether the critic tier was called on (prompt risk or a detector).
        outcome: The critic tier's outcome, when it ran for the caller.
        fail_reason: Set when the policy's fail mode decided.
        final_text: The text that may go out (responses only).
        violated_rules: Rules found broken outside a critic outcome (a stream's
            detectors); the verdict lists these and the outcome's.
    """

    decision: Decision
    decided_by: Tier
    route: RouteResult
    policy: Policy
    constitution: Constitution
    reason: str
    escalated: bool = False
    outcome: Outcome | None = None
    fail_reason: str = ""
    final_text: str = ""
    violated_rules: tuple[str, ...] = ()

    @property
    def fallback_applied(self) -> bool:
        """Whether the fail mode, not a judgement, decided."""
        return bool(self.fail_reason)


@dataclass(frozen=True)
class GenerateResult:
    """The prompt's check, the answer's check (if one was generated), and the text to send."""

    prompt: CheckResult
    response: CheckResult | None
    final_text: str
    generate_ms: float = 0.0
    generator_usage: Usage = field(default_factory=Usage)


async def check_prompt(
    gateway: Gateway,
    text: str,
    policy: Policy,
    *,
    request_id: str,
    deadline: Deadline,
    routed: RouteResult | None = None,
) -> CheckResult:
    """Route a user's prompt and, if it is escalated, have the critic judge it.

    `routed` is the router's result when the caller already has it (a
    conversation check may raise a route to ESCALATE for a reason the text
    alone does not show).
    """
    routed = routed or await route(gateway, text, policy)
    constitution = gateway.constitution(policy)
    if routed.route is not Route.ESCALATE:
        decision = _ROUTE_DECISIONS[routed.route]
        return CheckResult(decision, routed.decided_by, routed, policy, constitution, routed.reason)
    if policy.critic_mode is not CriticMode.SYNC:
        if policy.critic_mode is CriticMode.SHADOW:
            gateway.in_background(
                _judge_and_record(
                    gateway,
                    text,
                    policy,
                    request_id,
                    Deadline(policy.critic_budget_ms / 1000),
                    "shadow",
                )
            )
        return _fail_mode_result(routed, policy, constitution, _MODE_REASONS[policy.critic_mode])
    outcome = await _judge_and_record(gateway, text, policy, request_id, deadline, "sync")
    decision = outcome.verdict
    return CheckResult(
        decision, Tier.CRITIC, routed, policy, constitution,
        _critic_reason(routed, outcome), escalated=True, outcome=outcome,
        fail_reason=outcome.fail_reason,
    )  # fmt: skip


async def check_response(
    gateway: Gateway,
    prompt: str,
    response: str,
    policy: Policy,
    *,
    request_id: str,
    deadline: Deadline,
    routed: RouteResult | None = None,
    system_prompt: str = "",
) -> CheckResult:
    """Check a draft answer; the critic loop runs only if the prompt's risk or a detector says so.

    With the application's `system_prompt`, a draft that repeats it is a violation.
    """
    routed = routed or await route(gateway, prompt, policy)
    constitution = gateway.constitution(policy)
    if routed.route is Route.BLOCK:
        return CheckResult(
            Decision.BLOCK, routed.decided_by, routed, policy, constitution,
            f"the prompt is blocked ({routed.reason}); the draft may not go out",
            final_text=constitution.safe_reply,
        )  # fmt: skip
    hits = detect(response, constitution, target=Target.RESPONSE, system_prompt=system_prompt)
    risky = routed.route is Route.ESCALATE
    if not risky and not hits:
        return CheckResult(
            Decision.ALLOW, Tier.EMBEDDING, routed, policy, constitution,
            f"{routed.reason} and no output detector matched: the draft passes untouched",
            final_text=response,
        )  # fmt: skip
    mode = policy.critic_mode
    critic = gateway.critic if mode is CriticMode.SYNC else gateway.local_critic
    if mode is CriticMode.SHADOW and gateway.critic.kind is CriticKind.LLM:
        shadow_deadline = Deadline(policy.critic_budget_ms / 1000)
        gateway.in_background(
            _review_and_record(gateway, prompt, response, policy, request_id, shadow_deadline,
                               gateway.critic, risky, "shadow", system_prompt)
        )  # fmt: skip
    outcome = await _review_and_record(
        gateway, prompt, response, policy, request_id, deadline, critic, risky,
        "sync" if mode is CriticMode.SYNC else mode.value, system_prompt,
    )  # fmt: skip
    fail_reason = outcome.fail_reason
    if fail_reason and mode is not CriticMode.SYNC:
        fail_reason = _MODE_REASONS[mode]
    trigger = "the prompt's risk" if risky else "an output detector"
    return CheckResult(
        outcome.verdict, Tier.CRITIC, routed, policy, constitution,
        f"{trigger} sent the draft to the critic: {_outcome_summary(outcome)}",
        escalated=True, outcome=outcome, fail_reason=fail_reason, final_text=outcome.final_text,
    )  # fmt: skip


async def generate(
    gateway: Gateway, prompt: str, policy: Policy, *, request_id: str, deadline: Deadline
) -> GenerateResult:
    """Check the prompt, draft an answer upstream, check the answer.

    Raises:
        FailedPrecondition: no upstream generator is configured.
        Unavailable: the upstream generator failed.
    """
    if gateway.generator is None:
        raise generator_not_configured()
    prompt_result = await check_prompt(
        gateway, prompt, policy, request_id=request_id, deadline=deadline
    )
    if prompt_result.decision is Decision.BLOCK:
        return GenerateResult(prompt_result, None, prompt_result.constitution.safe_reply)
    start = time.perf_counter()
    try:
        with span(gateway.tracer, "generate", model=gateway.generator.model):
            draft, usage = await gateway.generator.generate(prompt, deadline)
    except CriticUnavailable as exc:
        raise generator_failed(exc) from exc
    generate_ms = (time.perf_counter() - start) * 1000.0
    response_result = await check_response(
        gateway, prompt, draft, policy, request_id=request_id, deadline=deadline,
        routed=prompt_result.route,
    )  # fmt: skip
    return GenerateResult(
        prompt_result, response_result, response_result.final_text, generate_ms, usage
    )


def generator_not_configured() -> FailedPrecondition:
    """The error of a Generate call on a gateway without an upstream model."""
    return FailedPrecondition(
        "Generate needs an upstream model: set generator.model and generator.base_url "
        "(or OPENAI_BASE_URL / OPENAI_API_KEY) with generator.enabled: true",
        reason="GENERATOR_NOT_CONFIGURED",
    )


def generator_failed(exc: CriticUnavailable) -> Unavailable:
    """The error of a Generate call whose upstream model failed."""
    return Unavailable(
        f"the upstream generator failed ({exc.reason}); retry later",
        reason="GENERATOR_UNAVAILABLE",
    )


async def route(gateway: Gateway, text: str, policy: Policy) -> RouteResult:
    """The router's result, from the route cache when the same text met the same
    thresholds and k on the same index snapshot.

    A cached result holds the snapshot it was routed on (~14 MB at 8k
    exemplars), so the cache's generation is the snapshot itself: the first
    route that sees a newer one empties the cache, and a result routed on a
    snapshot that is no longer the cache's is not kept. A replaced snapshot thus
    outlives its replacement only until the next check, never until LRU eviction.
    """
    key = (text, policy.thresholds, policy.k)
    cached = gateway.route_cache.get(key, generation=gateway.index.index)
    if cached is not None:
        with span(gateway.tracer, "route", cached=True, route=cached.route.value):
            return replace(cached, timings=Timings())
    start_ns = now_ns()
    with span(gateway.tracer, "route", cached=False) as opened:
        routed = await gateway.router.route(
            text, thresholds=policy.thresholds, embed=gateway.batcher.embed, k=policy.k or None
        )
        add_stage_spans(gateway.tracer, start_ns, routed.timings)
        opened.set_attribute("route", routed.route.value)
        opened.set_attribute("risk_score", routed.risk_score)
    gateway.route_cache.put(key, routed, generation=routed.index)
    return routed


def _fail_mode_result(
    routed: RouteResult, policy: Policy, constitution: Constitution, reason: str
) -> CheckResult:
    decision = Decision.BLOCK if policy.fail_mode is FailMode.CLOSED else Decision.ALLOW
    return CheckResult(
        decision, Tier.CRITIC, routed, policy, constitution,
        f"{routed.reason}: escalated, but the critic does not judge for the caller "
        f"({reason}); the fail mode '{policy.fail_mode.value}' decides ({decision.value})",
        escalated=True, fail_reason=reason,
    )  # fmt: skip


def _outcome_summary(outcome: Outcome) -> str:
    who = f"{outcome.critic.value} critic" + (f" ({outcome.model})" if outcome.model else "")
    if outcome.fail_reason:
        return (
            f"the {who} could not judge ({outcome.fail_reason}); the fail mode decides "
            f"({outcome.verdict.value})"
        )
    rules = f" ({', '.join(outcome.violated_rules)})" if outcome.violated_rules else ""
    return f"the {who} decided {outcome.verdict.value}{rules}"


def _critic_reason(routed: RouteResult, outcome: Outcome) -> str:
    return f"{routed.reason}: escalated; {_outcome_summary(outcome)}"


async def _judge_and_record(
    gateway: Gateway, text: str, policy: Policy, request_id: str, deadline: Deadline, mode: str
) -> Outcome:
    critic = gateway.critic if mode != "off" else gateway.local_critic
    with span(gateway.tracer, "critic", target="prompt", critic=critic.kind.value, mode=mode):
        outcome = await judge_prompt(
            prompt=text, constitution=gateway.constitution(policy), critic=critic,
            deadline=deadline, fail_mode=policy.fail_mode,
        )  # fmt: skip
    await record_outcome(gateway, policy, request_id, Target.PROMPT, mode, text, "", outcome)
    if outcome.critic is CriticKind.LLM and not outcome.fail_reason and policy.record_texts:
        await asyncio.to_thread(_propose, gateway, text, outcome, request_id, policy)
    return outcome


async def _review_and_record(
    gateway: Gateway, prompt: str, draft: str, policy: Policy, request_id: str,
    deadline: Deadline, critic: Critic, risky: bool, mode: str, system_prompt: str = "",
) -> Outcome:  # fmt: skip
    with span(gateway.tracer, "critic", target="response", critic=critic.kind.value, mode=mode):
        outcome = await review_response(
            prompt=prompt, draft=draft, constitution=gateway.constitution(policy), critic=critic,
            deadline=deadline, max_rounds=policy.max_rounds, fail_mode=policy.fail_mode,
            needs_judgement=risky, recheck=gateway.blocking_prefilter_rules,
            system_prompt=system_prompt,
        )  # fmt: skip
    await record_outcome(gateway, policy, request_id, Target.RESPONSE, mode, prompt, draft, outcome)
    return outcome


async def record_outcome(
    gateway: Gateway, policy: Policy, request_id: str, target: Target, mode: str,
    prompt: str, draft: str, outcome: Outcome,
) -> None:  # fmt: skip
    """Keep one critic judgement in the critic records (the data flywheel)."""
    usage = outcome.usage
    revision = outcome.rounds[-1].judged if len(outcome.rounds) > 1 else ""
    record = CriticRecord(
        request_id=request_id, policy=policy.name,
        constitution=gateway.constitution(policy).label, target=target.value, mode=mode,
        prompt=prompt, draft=draft, critique=outcome.critique, revision=revision,
        final_text=outcome.final_text, decision=outcome.verdict.value,
        violated_rules=outcome.violated_rules, critic=outcome.critic.value, model=outcome.model,
        rounds=len(outcome.rounds), calls=usage.calls, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd,
        latency_ms=outcome.critic_ms, fail_reason=outcome.fail_reason,
    )  # fmt: skip
    await asyncio.to_thread(gateway.records.add, record, store_texts=policy.record_texts)


def _propose(
    gateway: Gateway, text: str, outcome: Outcome, request_id: str, policy: Policy
) -> None:
    """A critic-confirmed attack becomes a risky proposal; a cleared prompt a benign near-miss."""
    risky = outcome.verdict is Decision.BLOCK
    gateway.index.store.propose(
        Exemplar(
            id="",
            text=text,
            label=Label.RISKY if risky else Label.BENIGN,
            category=(outcome.violated_rules[0] if risky and outcome.violated_rules else
                      "critic_confirmed" if risky else "benign_hard"),
            source=f"critic:{outcome.model}",
            added_by="critic",
            reason=f"request {request_id}, policy {policy.name}: {outcome.critique}"[:500],
        )
    )  # fmt: skip
