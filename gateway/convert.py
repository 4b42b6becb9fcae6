"""Domain results to protobuf messages: the one translation layer."""

from __future__ import annotations

from embeddings_index.store import ExemplarStore
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway.config import CriticMode
from gateway.pipeline import CheckResult
from router.decision import Decision, Tier
from router.prefilter import PrefilterHit, RuleAction

__all__ = ["verdict_to_proto"]

DECISIONS = {
    Decision.ALLOW: pb.DECISION_ALLOW,
    Decision.BLOCK: pb.DECISION_BLOCK,
    Decision.REVISE: pb.DECISION_REVISE,
}
TIERS = {
    Tier.PREFILTER: pb.TIER_PREFILTER,
    Tier.EMBEDDING: pb.TIER_EMBEDDING,
    Tier.CRITIC: pb.TIER_CRITIC,
}
CRITIC_MODES = {
    CriticMode.SYNC: pb.CRITIC_MODE_SYNC,
    CriticMode.SHADOW: pb.CRITIC_MODE_SHADOW,
    CriticMode.OFF: pb.CRITIC_MODE_OFF,
}
_ACTIONS = {
    RuleAction.BLOCK: pb.PREFILTER_ACTION_BLOCK,
    RuleAction.SIGNAL: pb.PREFILTER_ACTION_SIGNAL,
}
_LABELS = {"risky": pb.LABEL_RISKY, "benign": pb.LABEL_BENIGN}


def verdict_to_proto(
    result: CheckResult,
    *,
    request_id: str,
    total_ms: float,
    store: ExemplarStore,
    generate_ms: float = 0.0,
) -> pb.Verdict:
    """The Verdict message for a check; exemplar texts come from `store` when exposed."""
    routed = result.route
    timings = routed.timings
    outcome = result.outcome
    verdict = pb.Verdict(
        decision=DECISIONS[result.decision],
        decided_by=TIERS[result.decided_by],
        risk_score=routed.risk_score,
        escalated=result.escalated,
        thresholds=pb.Thresholds(
            escalate_at=routed.thresholds.escalate_at, block_at=routed.thresholds.block_at
        ),
        policy=result.policy.name,
        index_version=routed.index.version,
        request_id=request_id,
        nearest_exemplars=_matches(result, store=store),
        prefilter_hits=[_hit(hit) for hit in routed.hits],
        timings=pb.Timings(
            normalize_ms=timings.normalize_ms,
            prefilter_ms=timings.prefilter_ms,
            embed_ms=timings.embed_ms,
            search_ms=timings.search_ms,
            critic_ms=outcome.critic_ms if outcome else 0.0,
            total_ms=total_ms,
            generate_ms=generate_ms,
        ),
        reason=result.reason,
        normalizations=list(routed.normalized.steps),
        fallback_applied=result.fallback_applied,
        fallback_reason=result.fail_reason,
        constitution=result.constitution.label,
        critic_mode=CRITIC_MODES[result.policy.critic_mode],
    )
    if outcome is not None:
        usage = outcome.usage
        verdict.violated_rule_ids.extend(outcome.violated_rules)
        verdict.critique = outcome.critique
        verdict.critic.CopyFrom(
            pb.CriticReport(
                kind=outcome.critic.value,
                model=outcome.model,
                rounds=len(outcome.rounds),
                calls=usage.calls,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=usage.cost_usd,
                notes=list(outcome.notes),
            )
        )
    return verdict


def _matches(result: CheckResult, *, store: ExemplarStore) -> list[pb.ExemplarMatch]:
    neighbors, index = result.route.neighbors, result.route.index
    if neighbors is None:
        return []
    expose = result.policy.expose_evidence
    ids = [index.ids[p] for p in neighbors.positions]
    texts = {eid: e.text for eid, e in store.get_many(ids).items()} if expose else {}
    return [
        pb.ExemplarMatch(
            exemplar_id=eid,
            label=_LABELS[index.label(position)],
            category=index.categories[position],
            similarity=float(similarity) if expose else 0.0,
            similarity_exposed=expose,
            text=texts.get(eid, ""),
        )
        for eid, position, similarity in zip(
            ids, neighbors.positions, neighbors.similarities, strict=True
        )
    ]


def _hit(hit: PrefilterHit) -> pb.PrefilterHit:
    return pb.PrefilterHit(
        rule_id=hit.rule_id,
        category=hit.category,
        action=_ACTIONS[hit.action],
        weight=hit.weight,
        view=hit.view,
    )
