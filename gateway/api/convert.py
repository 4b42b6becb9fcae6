"""Domain results to protobuf messages: the one translation layer."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from embeddings_index.database import DatabaseError
from embeddings_index.store import Exemplar, ExemplarStore
from embeddings_index.vocabulary import (
    CriticKind,
    CriticMode,
    Decision,
    FailMode,
    Label,
    Role,
    Route,
    StreamMode,
    Tier,
)
from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway.runtime.admin_state import AuditEvent
from gateway.runtime.config import Policy
from gateway.runtime.conversation import ConversationResult
from gateway.runtime.pipeline import CheckResult
from router.prefilter import PrefilterHit, RuleAction

__all__ = [
    "AUDIT_ACTIONS",
    "CRITIC_MODES",
    "FAIL_MODES",
    "LABELS",
    "LABEL_NAMES",
    "ROLES",
    "STREAM_MODES",
    "audit_event_to_proto",
    "conversation_verdict_extras",
    "decision_counts_to_proto",
    "exemplar_to_proto",
    "exposed_texts",
    "exposes_texts",
    "policy_from_proto",
    "policy_to_proto",
    "route_counts_to_proto",
    "timestamp",
    "verdict_to_proto",
]

log = logging.getLogger(__name__)

ROLES = {
    Role.SYSTEM: pb.ROLE_SYSTEM,
    Role.USER: pb.ROLE_USER,
    Role.ASSISTANT: pb.ROLE_ASSISTANT,
    Role.TOOL: pb.ROLE_TOOL,
    Role.DOCUMENT: pb.ROLE_DOCUMENT,
}
STREAM_MODES = {
    StreamMode.HOLD_BACK: pb.STREAM_MODE_HOLD_BACK,
    StreamMode.STREAM_FIRST: pb.STREAM_MODE_STREAM_FIRST,
    StreamMode.AUDIT: pb.STREAM_MODE_AUDIT,
}
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
    RuleAction.ESCALATE: pb.PREFILTER_ACTION_ESCALATE,
}
LABELS: dict[str, pb.Label] = {Label.RISKY: pb.LABEL_RISKY, Label.BENIGN: pb.LABEL_BENIGN}
LABEL_NAMES = {value: name for name, value in LABELS.items()}
FAIL_MODES = {FailMode.CLOSED: pb.FAIL_MODE_CLOSED, FailMode.OPEN: pb.FAIL_MODE_OPEN}
_CRITIC_KINDS = {CriticKind.LLM: pb.CRITIC_KIND_LLM, CriticKind.LOCAL: pb.CRITIC_KIND_LOCAL}
_ROUTES = {
    Route.ALLOW: pb.ROUTE_ALLOW,
    Route.ESCALATE: pb.ROUTE_ESCALATE,
    Route.BLOCK: pb.ROUTE_BLOCK,
}
_ORIGINS = {"config": apb.POLICY_ORIGIN_CONFIG, "admin": apb.POLICY_ORIGIN_ADMIN}
# The audit log stores these names; the admin servicer writes only these.
AUDIT_ACTIONS = {
    "add_exemplars": apb.AUDIT_ACTION_ADD_EXEMPLARS,
    "delete_exemplar": apb.AUDIT_ACTION_DELETE_EXEMPLAR,
    "rollback_index": apb.AUDIT_ACTION_ROLLBACK_INDEX,
    "accept_proposal": apb.AUDIT_ACTION_ACCEPT_PROPOSAL,
    "reject_proposal": apb.AUDIT_ACTION_REJECT_PROPOSAL,
    "update_policy": apb.AUDIT_ACTION_UPDATE_POLICY,
}


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp for `seconds` since the Unix epoch (as time.time() gives them)."""
    value = Timestamp()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def verdict_to_proto(
    result: CheckResult,
    *,
    request_id: str,
    total_ms: float,
    exemplar_texts: Mapping[str, str],
    generate_ms: float = 0.0,
) -> pb.Verdict:
    """The Verdict message for a check, with `exemplar_texts` (`exposed_texts`) when
    its policy exposes evidence."""
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
        nearest_exemplars=_matches(result, exemplar_texts),
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
    violated = [*result.violated_rules, *(outcome.violated_rules if outcome else ())]
    verdict.violated_rule_ids.extend(dict.fromkeys(violated))
    if outcome is not None:
        usage = outcome.usage
        verdict.critique = outcome.critique
        verdict.critic.CopyFrom(
            pb.CriticReport(
                critic_kind=_CRITIC_KINDS[outcome.critic],
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


def exposes_texts(result: CheckResult) -> bool:
    """The verdict names exemplars and its policy shows their texts (a store read)."""
    return result.route.neighbors is not None and result.policy.expose_evidence


def exposed_texts(result: CheckResult, store: ExemplarStore) -> dict[str, str]:
    """The texts of the exemplars the verdict names, by id, when its policy exposes
    evidence; empty if the store fails (the verdict stands without them).

    Reads the store: call it off the event loop (a PostgreSQL round trip, or a
    lock held by an import, must not stall every other call).
    """
    neighbors, index = result.route.neighbors, result.route.index
    if neighbors is None or not result.policy.expose_evidence:
        return {}
    try:
        return {
            eid: e.text
            for eid, e in store.get_many(index.ids[p] for p in neighbors.positions).items()
        }
    except DatabaseError:
        log.warning("exemplar texts left out of a verdict: the store failed", exc_info=True)
        return {}


def _matches(result: CheckResult, texts: Mapping[str, str]) -> list[pb.ExemplarMatch]:
    neighbors, index = result.route.neighbors, result.route.index
    if neighbors is None:
        return []
    expose = result.policy.expose_evidence
    ids = [index.ids[p] for p in neighbors.positions]
    return [
        pb.ExemplarMatch(
            exemplar_id=eid,
            label=LABELS[index.label(position)],
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


def exemplar_to_proto(exemplar: Exemplar) -> apb.Exemplar:
    """An exemplar with its provenance."""
    return apb.Exemplar(
        exemplar_id=exemplar.id,
        text=exemplar.text,
        label=LABELS[exemplar.label],
        category=exemplar.category,
        source=exemplar.source,
        added_by=exemplar.added_by,
        reason=exemplar.reason,
        create_time=timestamp(exemplar.created_at) if exemplar.created_at else None,
        added_version=exemplar.added_version,
    )


def audit_event_to_proto(event: AuditEvent) -> apb.AuditEvent:
    """An audit log entry; an action this contract has no value for stays UNSPECIFIED."""
    return apb.AuditEvent(
        event_id=event.event_id,
        event_time=timestamp(event.time),
        actor=event.actor,
        audit_action=AUDIT_ACTIONS.get(event.action, apb.AUDIT_ACTION_UNSPECIFIED),
        target=event.target,
        before=event.before,
        after=event.after,
    )


def decision_counts_to_proto(decisions: Mapping[str, int]) -> list[apb.DecisionCount]:
    """Traffic counters keyed "tier/decision" (TrafficStats) as typed counts, in enum order."""
    counts = []
    for key, count in decisions.items():
        tier, _, decision = key.partition("/")
        counts.append(apb.DecisionCount(
            tier=TIERS[Tier(tier)], decision=DECISIONS[Decision(decision)], count=count
        ))  # fmt: skip
    return sorted(counts, key=lambda c: (c.tier, c.decision))


def route_counts_to_proto(routes: Mapping[str, int]) -> list[apb.RouteCount]:
    """Counts keyed by route name ("allow", "escalate", "block"), in enum order."""
    counts = [apb.RouteCount(route=_ROUTES[Route(name)], count=n) for name, n in routes.items()]
    return sorted(counts, key=lambda c: c.route)


def policy_to_proto(policy: Policy, *, origin: str) -> apb.Policy:
    """A policy as the admin API shows it."""
    return apb.Policy(
        name=policy.name,
        escalate_at=policy.escalate_at,
        block_at=policy.block_at,
        k=policy.k,
        constitution=policy.constitution,
        critic_mode=CRITIC_MODES[policy.critic_mode],
        fail_mode=FAIL_MODES[policy.fail_mode],
        max_rounds=policy.max_rounds,
        critic_budget_ms=policy.critic_budget_ms,
        record_texts=policy.record_texts,
        expose_evidence=policy.expose_evidence,
        escalation_budget=policy.escalation_budget,
        policy_origin=_ORIGINS[origin],
        stream_mode=STREAM_MODES[policy.stream_mode],
    )


_MASKABLE = {
    "escalate_at", "block_at", "k", "constitution", "critic_mode", "fail_mode", "max_rounds",
    "critic_budget_ms", "record_texts", "expose_evidence", "escalation_budget", "stream_mode",
}  # fmt: skip


def policy_from_proto(message: apb.Policy, mask: Sequence[str]) -> dict[str, Any]:
    """The masked fields of `message` as plain values for `PolicyRegistry.update`.

    `mask` is the paths of the request's FieldMask.

    Raises:
        ValueError: a mask entry is not an updatable field, or an enum is unspecified.
    """
    changes: dict[str, Any] = {}
    for name in mask:
        if name not in _MASKABLE:
            raise ValueError(f"update_mask: {name!r} is not one of {sorted(_MASKABLE)}")
        value = getattr(message, name)
        if name == "critic_mode":
            modes = {v: k.value for k, v in CRITIC_MODES.items()}
            if value not in modes:
                raise ValueError("critic_mode: must be SYNC, SHADOW or OFF")
            value = modes[value]
        elif name == "fail_mode":
            fail_modes = {v: k.value for k, v in FAIL_MODES.items()}
            if value not in fail_modes:
                raise ValueError("fail_mode: must be CLOSED or OPEN")
            value = fail_modes[value]
        elif name == "stream_mode":
            stream_modes = {v: k.value for k, v in STREAM_MODES.items()}
            if value not in stream_modes:
                raise ValueError("stream_mode: must be HOLD_BACK, STREAM_FIRST or AUDIT")
            value = stream_modes[value]
        changes[name] = value
    return changes


def conversation_verdict_extras(
    verdict: pb.Verdict,
    result: ConversationResult | None = None,
    *,
    stream_mode: StreamMode | None = None,
) -> pb.Verdict:
    """`verdict` with what a conversation or stream check adds: the driving message,
    the session's risk, the stream's mode."""
    if result is not None:
        driver = result.driver
        verdict.driving_message.CopyFrom(
            pb.MessageRef(
                index=driver.index, role=ROLES[driver.role],
                span_start=driver.span[0], span_end=driver.span[1],
            )
        )  # fmt: skip
        if result.session is not None:
            verdict.session.CopyFrom(
                pb.SessionRisk(
                    session_id=result.session.session_id,
                    risk_score=result.session.risk_score,
                    turns=result.session.turns,
                    combined_risk_score=result.session.combined_risk_score,
                )
            )
    if stream_mode is not None:
        verdict.stream_mode = STREAM_MODES[stream_mode]
        verdict.driving_message.CopyFrom(pb.MessageRef(index=-1, role=pb.ROLE_ASSISTANT))
    return verdict
