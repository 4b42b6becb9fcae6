"""GuardrailService over gRPC: validate, resolve the policy, run the pipeline, convert."""

from __future__ import annotations

import logging
import time

import grpc

from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.app import Gateway
from gateway.convert import verdict_to_proto
from gateway.errors import DeadlineTooShort, InvalidArgument
from gateway.interceptors import REQUEST_ID
from gateway.pipeline import check_prompt

__all__ = ["POLICY_METADATA_KEY", "GuardrailServicer"]

log = logging.getLogger(__name__)

POLICY_METADATA_KEY = "x-tierguard-policy"
_MIN_DEADLINE_S = 0.001


class GuardrailServicer(pb_grpc.GuardrailServiceServicer):
    """Thin adapter from GuardrailService calls to `gateway.pipeline`."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def CheckPrompt(
        self, request: pb.CheckPromptRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckPromptResponse:
        start = time.perf_counter()
        text = self._validated_text(request.text)
        policy = self._gateway.resolve_policy(
            request.policy, _metadata(context, POLICY_METADATA_KEY)
        )
        remaining = context.time_remaining()
        if remaining is not None and remaining < _MIN_DEADLINE_S:
            raise DeadlineTooShort("the call's deadline expired before the check could start")
        result = await check_prompt(self._gateway, text, policy)
        total_ms = (time.perf_counter() - start) * 1000.0
        verdict = verdict_to_proto(
            result, request_id=REQUEST_ID.get(), total_ms=total_ms, store=self._gateway.index.store
        )
        log.info(
            "check_prompt request_id=%s policy=%s decision=%s tier=%s risk=%.3f escalated=%s "
            "fallback=%s total_ms=%.1f",
            verdict.request_id, policy.name, result.decision.value, result.decided_by.value,
            result.route.risk_score, result.escalated, result.fallback_applied, total_ms,
        )  # fmt: skip
        return pb.CheckPromptResponse(verdict=verdict)

    def _validated_text(self, text: str) -> str:
        if not text.strip():
            raise InvalidArgument("text", "must contain at least one non-whitespace character")
        limit = self._gateway.config.server.max_text_chars
        if len(text) > limit:
            raise InvalidArgument(
                "text",
                f"is {len(text)} characters long; the limit is {limit}: send a shorter text "
                "or split it into parts",
            )
        return text


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for entry_key, value in context.invocation_metadata() or ():
        if entry_key == key:
            return str(value)
    return ""
