"""Domain results to protobuf messages: the one translation layer."""

from __future__ import annotations

from embeddings_index.store import ExemplarStore
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
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
_ACTIONS = {
    RuleAction.BLOCK: pb.PREFILTER_ACTION_BLOCK,
    RuleAction.SIGNAL: pb.PREFILTER_ACTION_SIGNAL,
}
_LABELS = {"risky": pb.LABEL_RISKY, "benign": pb.LABEL_BENIGN}


def verdict_to_proto(
    result: CheckResult, *, request_id: str, total_ms: float, store: ExemplarStore
) -> pb.Verdict:
    """The Verdict message for a check; exemplar texts come from `store` when exposed."""
    routed = result.route
    expose = result.policy.expose_evidence
    timings = routed.timings
    return pb.Verdict(
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
        nearest_exemplars=_matches(result, expose=expose, store=store),
        prefilter_hits=[_hit(hit) for hit in routed.hits],
        timings=pb.Timings(
            normalize_ms=timings.normalize_ms,
            prefilter_ms=timings.prefilter_ms,
            embed_ms=timings.embed_ms,
            search_ms=timings.search_ms,
            critic_ms=result.critic_ms,
            total_ms=total_ms,
        ),
        reason=result.reason,
        normalizations=list(routed.normalized.steps),
        fallback_applied=result.fallback_applied,
    )


def _matches(result: CheckResult, *, expose: bool, store: ExemplarStore) -> list[pb.ExemplarMatch]:
    neighbors, index = result.route.neighbors, result.route.index
    if neighbors is None:
        return []
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
