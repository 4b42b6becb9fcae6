"""GuardrailService over gRPC: validate, resolve the policy, set the deadline, run, convert."""

from __future__ import annotations

import logging
import time

from critic.types import Deadline
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.convert import verdict_to_proto
from gateway.api.interceptors import PRINCIPAL, REQUEST_ID, ServicerContext
from gateway.api.validation import refused_as_invalid, validated_text
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from gateway.runtime.decision_log import LoggedDecision
from gateway.runtime.errors import DeadlineTooShort
from gateway.runtime.pipeline import CheckResult, check_prompt, check_response, generate

__all__ = ["POLICY_METADATA_KEY", "GuardrailServicer"]

log = logging.getLogger(__name__)

POLICY_METADATA_KEY = "x-tierguard-policy"
# Answer this much before the caller's deadline, so a fail-mode verdict arrives in time.
_DEADLINE_MARGIN_S = 0.05
_DEADLINE_MARGIN_SHARE = 0.1


class GuardrailServicer(pb_grpc.GuardrailServiceServicer):
    """Thin adapter from GuardrailService calls to `gateway.runtime.pipeline`."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def CheckPrompt(
        self, request: pb.CheckPromptRequest, context: ServicerContext
    ) -> pb.CheckPromptResponse:
        start = time.perf_counter()
        text = self._text("text", request.text)
        policy = self._policy(request.policy, context)
        deadline = self._deadline(policy, context)
        with refused_as_invalid("text"):
            result = await check_prompt(
                self._gateway, text, policy, request_id=REQUEST_ID.get(), deadline=deadline
            )
        verdict = self._verdict("check_prompt", result, start)
        self._record("check_prompt", result, text)
        return pb.CheckPromptResponse(verdict=verdict)

    async def CheckResponse(
        self, request: pb.CheckResponseRequest, context: ServicerContext
    ) -> pb.CheckResponseResponse:
        start = time.perf_counter()
        prompt = self._text("prompt", request.prompt)
        response = self._text("response", request.response)
        policy = self._policy(request.policy, context)
        deadline = self._deadline(policy, context)
        with refused_as_invalid("prompt"):  # the router reads the prompt only
            result = await check_response(
                self._gateway, prompt, response, policy, request_id=REQUEST_ID.get(),
                deadline=deadline,
            )  # fmt: skip
        verdict = self._verdict("check_response", result, start)
        self._record("check_response", result, prompt)
        return pb.CheckResponseResponse(verdict=verdict, final_text=result.final_text)

    async def Generate(
        self, request: pb.GenerateRequest, context: ServicerContext
    ) -> pb.GenerateResponse:
        start = time.perf_counter()
        prompt = self._text("prompt", request.prompt)
        policy = self._policy(request.policy, context)
        deadline = self._deadline(policy, context)
        with refused_as_invalid("prompt"):
            result = await generate(
                self._gateway, prompt, policy, request_id=REQUEST_ID.get(), deadline=deadline
            )
        reply = pb.GenerateResponse(
            prompt_verdict=self._verdict("generate.prompt", result.prompt, start),
            final_text=result.final_text,
        )
        if result.response is not None:
            reply.response_verdict.CopyFrom(
                self._verdict("generate.response", result.response, start, result.generate_ms)
            )
        self._record("generate", result.response or result.prompt, prompt)
        return reply

    def _record(self, rpc: str, result: CheckResult, text: str) -> None:
        """Count the verdict and append it to the decision log."""
        self._gateway.stats.count(
            result.policy.name, tier=result.decided_by.value, decision=result.decision.value,
            escalated=result.escalated, fallback=result.fallback_applied,
        )  # fmt: skip
        self._gateway.decisions.append(
            LoggedDecision(
                request_id=REQUEST_ID.get(), rpc=rpc, policy=result.policy.name,
                decision=result.decision.value, tier=result.decided_by.value,
                route=result.route.route.value, risk_score=result.route.risk_score,
                fallback_reason=result.fail_reason, index_version=result.route.index.version,
                text=text, keep_text=result.policy.record_texts,
            )
        )  # fmt: skip

    def _text(self, field: str, text: str) -> str:
        return validated_text(field, text, max_chars=self._gateway.config.server.max_text_chars)

    def _policy(self, requested: str, context: ServicerContext) -> Policy:
        return self._gateway.resolve_policy(
            requested, _metadata(context, POLICY_METADATA_KEY), principal=PRINCIPAL.get()
        )

    @staticmethod
    def _deadline(policy: Policy, context: ServicerContext) -> Deadline:
        """The critic tier's deadline: the policy's budget, cut short by the caller's deadline."""
        budget = policy.critic_budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is None:
            return Deadline(budget)
        if remaining <= 0.001:
            raise DeadlineTooShort("the call's deadline expired before the check could start")
        margin = max(_DEADLINE_MARGIN_S, _DEADLINE_MARGIN_SHARE * remaining)
        return Deadline(min(budget, remaining - margin))

    def _verdict(
        self, rpc: str, result: CheckResult, start: float, generate_ms: float = 0.0
    ) -> pb.Verdict:
        total_ms = (time.perf_counter() - start) * 1000.0
        verdict = verdict_to_proto(
            result, request_id=REQUEST_ID.get(), total_ms=total_ms,
            store=self._gateway.index.store, generate_ms=generate_ms,
        )  # fmt: skip
        log.info(
            "%s request_id=%s policy=%s decision=%s tier=%s risk=%.3f escalated=%s "
            "fallback=%s total_ms=%.1f",
            rpc, verdict.request_id, result.policy.name, result.decision.value,
            result.decided_by.value, result.route.risk_score, result.escalated,
            result.fail_reason or "-", total_ms,
        )  # fmt: skip
        return verdict


def _metadata(context: ServicerContext, key: str) -> str:
    for entry_key, value in context.invocation_metadata() or ():
        if entry_key == key:
            return str(value)
    return ""
