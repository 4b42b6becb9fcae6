"""AdminService over gRPC: exemplars, proposals, rollback, policies, stats, audit, replay.

The interceptor has already checked the admin credential (PRINCIPAL). Every
change runs off the event loop (store writes and index rebuilds happen in a
thread, so checks in flight never wait), is durable when acknowledged, and is
written to the audit log with who, what, before and after.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections import Counter
from typing import Any

from embeddings_index.store import Exemplar, StoreError
from embeddings_index.vocabulary import Decision, Route
from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway.api.convert import (
    LABEL_NAMES,
    LABELS,
    audit_event_to_proto,
    decision_counts_to_proto,
    exemplar_to_proto,
    exposed_texts,
    policy_from_proto,
    policy_to_proto,
    route_counts_to_proto,
    verdict_to_proto,
)
from gateway.api.interceptors import PRINCIPAL, REQUEST_ID, ServicerContext
from gateway.api.validation import refused_as_invalid, validated_text
from gateway.runtime.app import Gateway
from gateway.runtime.config import ConfigError, Policy
from gateway.runtime.errors import InvalidArgument, NotFound
from gateway.runtime.pipeline import CheckResult
from gateway.runtime.policies import policy_to_dict
from router.decision import Thresholds, route_for

__all__ = ["AdminServicer"]

MAX_BATCH = 1000
MAX_PAGE = 1000
DEFAULT_NEAR_DUPLICATE = 0.97


class AdminServicer(apb_grpc.AdminServiceServicer):
    """Thin adapter from AdminService calls to the gateway's parts."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @property
    def _actor(self) -> str:
        return PRINCIPAL.get().name

    def _audit(self, action: str, target: str, before: Any = None, after: Any = None) -> None:
        self._gateway.admin_state.audit(self._actor, action, target, before, after)

    # -- exemplars -----------------------------------------------------------

    async def AddExemplars(
        self, request: apb.AddExemplarsRequest, context: ServicerContext
    ) -> apb.AddExemplarsResponse:
        state = self._gateway.admin_state
        if (cached := state.remembered("AddExemplars", request.request_id)) is not None:
            return apb.AddExemplarsResponse.FromString(cached)
        exemplars = self._validated_exemplars(request.exemplars)
        threshold = request.near_duplicate_similarity or DEFAULT_NEAR_DUPLICATE
        if not 0.0 < threshold <= 1.0:
            raise InvalidArgument("near_duplicate_similarity", "must be in (0, 1]; 0 means 0.97")
        with refused_as_invalid("exemplars"):  # a text that expands past the limits
            outcomes, version = await asyncio.to_thread(
                self._gateway.index.add_checked, exemplars, near_duplicate_similarity=threshold
            )
        statuses = {
            "added": apb.ADD_STATUS_ADDED,
            "duplicate": apb.ADD_STATUS_DUPLICATE,
            "near_duplicate": apb.ADD_STATUS_NEAR_DUPLICATE,
        }
        reply = apb.AddExemplarsResponse(
            results=[
                apb.AddExemplarResult(
                    status=statuses[o.status], exemplar_id=o.exemplar_id, similarity=o.similarity
                )
                for o in outcomes
            ],
            index_version=version,
        )
        added = [o.exemplar_id for o in outcomes if o.status == "added"]
        if added:
            summary = dict(Counter(o.status for o in outcomes))
            self._audit("add_exemplars", ",".join(added[:20]), None,
                        {"index_version": version, "results": summary, "ids": added})  # fmt: skip
        state.remember("AddExemplars", request.request_id, reply.SerializeToString())
        return reply

    def _validated_exemplars(self, items: Any) -> list[Exemplar]:
        if not items:
            raise InvalidArgument("exemplars", "send at least one exemplar")
        if len(items) > MAX_BATCH:
            raise InvalidArgument("exemplars", f"at most {MAX_BATCH} per call; split the batch")
        limit = self._gateway.config.server.max_text_chars
        exemplars = []
        for i, item in enumerate(items):
            where = f"exemplars[{i}]"
            validated_text(f"{where}.text", item.text, max_chars=limit)
            if item.label not in LABEL_NAMES:
                raise InvalidArgument(f"{where}.label", "must be LABEL_RISKY or LABEL_BENIGN")
            if not item.category.strip():
                raise InvalidArgument(f"{where}.category", "is required, e.g. prompt_injection")
            exemplars.append(
                Exemplar(
                    id=item.exemplar_id, text=item.text, label=LABEL_NAMES[item.label],
                    category=item.category.strip(), source=item.source or "admin",
                    added_by=self._actor, reason=item.reason,
                )
            )  # fmt: skip
        return exemplars

    async def DeleteExemplar(
        self, request: apb.DeleteExemplarRequest, context: ServicerContext
    ) -> apb.DeleteExemplarResponse:
        if not request.exemplar_id:
            raise InvalidArgument("exemplar_id", "is required")
        store = self._gateway.index.store
        before = await asyncio.to_thread(store.get, request.exemplar_id)
        version = await asyncio.to_thread(self._gateway.index.delete, request.exemplar_id)
        if before is None or version is None:
            raise NotFound(f"no live exemplar {request.exemplar_id!r}", reason="EXEMPLAR_NOT_FOUND")
        self._audit("delete_exemplar", request.exemplar_id,
                    {**dataclasses.asdict(before), "reason": request.reason},
                    {"index_version": version})  # fmt: skip
        return apb.DeleteExemplarResponse(index_version=version)

    async def ListExemplars(
        self, request: apb.ListExemplarsRequest, context: ServicerContext
    ) -> apb.ListExemplarsResponse:
        size = _page_size(request.page_size, default=100)
        after = _decode_token(request.page_token)
        label = LABEL_NAMES.get(request.label) if request.label else None
        page = await asyncio.to_thread(
            self._gateway.index.store.list, label=label, category=request.category or None,
            source=request.source or None, after_row_id=after, limit=size + 1,
        )  # fmt: skip
        more = len(page) > size
        page = page[:size]
        return apb.ListExemplarsResponse(
            exemplars=[exemplar_to_proto(e) for e in page],
            next_page_token=_encode_token(page[-1].row_id) if more else "",
        )

    async def SearchExemplars(
        self, request: apb.SearchExemplarsRequest, context: ServicerContext
    ) -> apb.SearchExemplarsResponse:
        limit = self._gateway.config.server.max_text_chars
        validated_text("text", request.text, max_chars=limit)
        k = request.k or 10
        if not 1 <= k <= 100:
            raise InvalidArgument("k", "must be between 1 and 100")
        policy = self._gateway.resolve_policy(request.policy)
        with refused_as_invalid("text"):
            routed = await self._gateway.router.route(
                request.text, thresholds=policy.thresholds, embed=self._gateway.batcher.embed, k=k
            )
        transparent = dataclasses.replace(policy, expose_evidence=True)
        decision = {Route.ALLOW: Decision.ALLOW, Route.BLOCK: Decision.BLOCK}.get(
            routed.route, Decision.BLOCK
        )
        result = CheckResult(
            decision, routed.decided_by, routed, transparent,
            self._gateway.constitution(policy), routed.reason,
            escalated=routed.route is Route.ESCALATE,
        )  # fmt: skip
        texts = await asyncio.to_thread(exposed_texts, result, self._gateway.index.store)
        verdict = verdict_to_proto(
            result, request_id=REQUEST_ID.get(), total_ms=0.0, exemplar_texts=texts
        )
        return apb.SearchExemplarsResponse(matches=verdict.nearest_exemplars, verdict=verdict)

    async def RollbackIndex(
        self, request: apb.RollbackIndexRequest, context: ServicerContext
    ) -> apb.RollbackIndexResponse:
        before = self._gateway.index.index.version
        try:
            version, removed, restored = await asyncio.to_thread(
                self._gateway.index.rollback, request.to_version
            )
        except StoreError as exc:
            raise InvalidArgument("to_version", str(exc)) from exc
        self._audit("rollback_index", f"index@{request.to_version}",
                    {"index_version": before, "reason": request.reason},
                    {"index_version": version, "removed": removed, "restored": restored})  # fmt: skip
        return apb.RollbackIndexResponse(index_version=version, removed=removed, restored=restored)

    # -- proposals -----------------------------------------------------------

    async def ListProposals(
        self, request: apb.ListProposalsRequest, context: ServicerContext
    ) -> apb.ListProposalsResponse:
        size = _page_size(request.page_size, default=100)
        after = _decode_token(request.page_token, kind=_PROPOSALS_TOKEN)
        page = await asyncio.to_thread(
            self._gateway.index.store.pending_proposals, after_id=after, limit=size + 1
        )
        more = len(page) > size
        page = page[:size]
        return apb.ListProposalsResponse(
            proposals=[
                apb.Proposal(proposal_id=pid, exemplar=exemplar_to_proto(e)) for pid, e in page
            ],
            next_page_token=_encode_token(page[-1][0], kind=_PROPOSALS_TOKEN) if more else "",
        )

    async def ReviewProposal(
        self, request: apb.ReviewProposalRequest, context: ServicerContext
    ) -> apb.ReviewProposalResponse:
        if request.proposal_id <= 0:
            raise InvalidArgument("proposal_id", "is required (an id from ListProposals)")
        if request.review not in (apb.PROPOSAL_REVIEW_ACCEPT, apb.PROPOSAL_REVIEW_REJECT):
            raise InvalidArgument(
                "review", "must be PROPOSAL_REVIEW_ACCEPT or PROPOSAL_REVIEW_REJECT"
            )
        accept = request.review == apb.PROPOSAL_REVIEW_ACCEPT
        index = self._gateway.index
        try:
            proposal = await asyncio.to_thread(
                index.store.review_proposal, request.proposal_id, accept=accept,
                reviewer=self._actor,
            )  # fmt: skip
        except StoreError as exc:
            raise NotFound(str(exc), reason="PROPOSAL_NOT_FOUND") from exc
        exemplar_id, version = "", index.index.version
        if accept:
            accepted = dataclasses.replace(
                proposal, added_by=f"{proposal.added_by}; accepted by {self._actor}"
            )
            outcomes, version = await asyncio.to_thread(
                index.add_checked, [accepted], near_duplicate_similarity=1.01
            )
            exemplar_id = outcomes[0].exemplar_id
        self._audit("accept_proposal" if accept else "reject_proposal",
                    str(request.proposal_id), dataclasses.asdict(proposal),
                    {"exemplar_id": exemplar_id, "index_version": version,
                     "reason": request.reason})  # fmt: skip
        return apb.ReviewProposalResponse(exemplar_id=exemplar_id, index_version=version)

    # -- policies --------------------------------------------------------------

    async def GetPolicy(
        self, request: apb.GetPolicyRequest, context: ServicerContext
    ) -> apb.GetPolicyResponse:
        policy = self._gateway.resolve_policy(request.name or self._gateway.policies.default_name)
        return apb.GetPolicyResponse(policy=self._policy(policy))

    async def ListPolicies(
        self, request: apb.ListPoliciesRequest, context: ServicerContext
    ) -> apb.ListPoliciesResponse:
        return apb.ListPoliciesResponse(
            policies=[self._policy(p) for p in self._gateway.policies.all()],
            default_policy=self._gateway.policies.default_name,
        )

    async def UpdatePolicy(
        self, request: apb.UpdatePolicyRequest, context: ServicerContext
    ) -> apb.UpdatePolicyResponse:
        state = self._gateway.admin_state
        if (cached := state.remembered("UpdatePolicy", request.request_id)) is not None:
            return apb.UpdatePolicyResponse.FromString(cached)
        name = request.policy.name
        if not name:
            raise InvalidArgument("policy.name", "is required")
        if not request.update_mask.paths:
            raise InvalidArgument("update_mask", "name the fields to change, e.g. escalate_at")
        try:
            changes = policy_from_proto(request.policy, request.update_mask.paths)
            before, after = await asyncio.to_thread(
                self._gateway.policies.update, name, changes, self._actor
            )
        except (ConfigError, ValueError) as exc:
            raise InvalidArgument(_field_of(exc, name), str(exc)) from exc
        self._audit("update_policy", name,
                    None if before is None else policy_to_dict(before),
                    policy_to_dict(after))  # fmt: skip
        reply = apb.UpdatePolicyResponse(policy=self._policy(after))
        state.remember("UpdatePolicy", request.request_id, reply.SerializeToString())
        return reply

    def _policy(self, policy: Policy) -> apb.Policy:
        return policy_to_proto(policy, origin=self._gateway.policies.origin(policy.name))

    # -- observation -------------------------------------------------------------

    async def GetStats(
        self, request: apb.GetStatsRequest, context: ServicerContext
    ) -> apb.GetStatsResponse:
        gateway = self._gateway
        counts = await asyncio.to_thread(gateway.index.store.counts)
        usage = await asyncio.to_thread(gateway.records.usage)
        pending = await asyncio.to_thread(gateway.index.store.count_pending_proposals)
        await asyncio.to_thread(gateway.decisions.flush)  # this gateway's last lines count too
        window = await asyncio.to_thread(gateway.decisions.traffic)
        traffic = []
        for name, counters in sorted(window.items()):
            policy = gateway.policies.get(name)
            budget = policy.escalation_budget if policy else 0.0
            traffic.append(
                apb.PolicyTraffic(
                    policy=name, requests=counters.requests,
                    decision_counts=decision_counts_to_proto(counters.decisions),
                    escalation_rate=counters.escalation_rate, escalation_budget=budget,
                    over_budget=bool(budget) and counters.escalation_rate > budget,
                    fallbacks=counters.fallbacks,
                )
            )  # fmt: skip
        return apb.GetStatsResponse(
            index_version=gateway.index.index.version,
            exemplar_counts=[
                apb.ExemplarCount(label=LABELS[label], category=category, count=n)
                for (label, category), n in sorted(counts.items())
            ],
            traffic=traffic,
            critic_usage=pb.CriticReport(
                calls=usage.calls,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=usage.cost_usd,
            ),
            pending_proposals=pending,
            uptime_s=gateway.stats.uptime_s,
        )

    async def ListAuditEvents(
        self, request: apb.ListAuditEventsRequest, context: ServicerContext
    ) -> apb.ListAuditEventsResponse:
        size = _page_size(request.page_size, default=50)
        before_id = _decode_token(request.page_token) or None
        events = await asyncio.to_thread(
            self._gateway.admin_state.audit_events, limit=size + 1, before_id=before_id
        )
        more = len(events) > size
        events = events[:size]
        return apb.ListAuditEventsResponse(
            events=[audit_event_to_proto(e) for e in events],
            next_page_token=_encode_token(events[-1].event_id) if more else "",
        )

    async def ReplayDecisions(
        self, request: apb.ReplayDecisionsRequest, context: ServicerContext
    ) -> apb.ReplayDecisionsResponse:
        policy = self._gateway.resolve_policy(request.policy or self._gateway.policies.default_name)
        try:
            thresholds = Thresholds(
                request.escalate_at if request.HasField("escalate_at") else policy.escalate_at,
                request.block_at if request.HasField("block_at") else policy.block_at,
            )
        except ValueError as exc:
            raise InvalidArgument("escalate_at", str(exc)) from exc
        limit = request.limit or 10_000
        if not 1 <= limit <= 1_000_000:
            raise InvalidArgument("limit", "must be between 1 and 1,000,000")
        await asyncio.to_thread(self._gateway.decisions.flush)
        rows = await asyncio.to_thread(self._gateway.decisions.recent_scores, policy.name, limit)
        before = Counter(route for route, _ in rows)
        replayed = [_replayed_route(route, score, thresholds) for route, score in rows]
        after = Counter(replayed)
        changed = sum(old != new for (old, _), new in zip(rows, replayed, strict=True))

        def per_1k(counts: Counter[str]) -> float:
            return 1000.0 * counts["escalate"] / len(rows) if rows else 0.0

        return apb.ReplayDecisionsResponse(
            replayed=len(rows), routes_before=route_counts_to_proto(before),
            routes_after=route_counts_to_proto(after), changed=changed,
            critic_calls_per_1k_before=per_1k(before), critic_calls_per_1k_after=per_1k(after),
            thresholds=pb.Thresholds(escalate_at=thresholds.escalate_at, block_at=thresholds.block_at),
        )  # fmt: skip


def _replayed_route(route: str, score: float, thresholds: Thresholds) -> str:
    """The route a logged decision gets under `thresholds` (a tier-0 block stays a block)."""
    if route == Route.BLOCK.value and score >= 1.0:
        return route
    return route_for(score, (), thresholds)[0].value


def _field_of(exc: Exception, name: str) -> str:
    message = str(exc)
    prefix = f"policies.{name}."
    if message.startswith(prefix):
        return "policy." + message[len(prefix) :].split(":", 1)[0]
    return "policy"


def _page_size(requested: int, *, default: int) -> int:
    if requested < 0 or requested > MAX_PAGE:
        raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE}")
    return requested or default


_PROPOSALS_TOKEN = "proposal"  # a token of one list is refused by another


def _encode_token(value: int, *, kind: str = "after") -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode()


def _decode_token(token: str, *, kind: str = "after") -> int:
    if not token:
        return 0
    try:
        found, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if found != kind:
            raise ValueError(found)
        return int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
