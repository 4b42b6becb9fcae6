"""GuardrailService over gRPC: validate, resolve the policy, set the deadline, run, convert."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

from critic.types import Deadline
from embeddings_index.vocabulary import Role
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.convert import (
    ROLES,
    STREAM_MODES,
    conversation_verdict_extras,
    exposed_texts,
    exposes_texts,
    verdict_to_proto,
)
from gateway.api.interceptors import PRINCIPAL, REQUEST_ID, ServicerContext, caller_key
from gateway.api.validation import refused_as_invalid, validated_text
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from gateway.runtime.conversation import ChatMessage, check_conversation
from gateway.runtime.decision_log import LoggedDecision
from gateway.runtime.errors import DeadlineTooShort, InvalidArgument
from gateway.runtime.pipeline import CheckResult, check_prompt, check_response, generate
from gateway.runtime.streaming import StreamCheck, StreamEvent, generate_stream
from gateway.runtime.tracing import current_span

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
        verdict = await self._verdict("check_prompt", result, start)
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
        verdict = await self._verdict("check_response", result, start)
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
            prompt_verdict=await self._verdict("generate.prompt", result.prompt, start),
            final_text=result.final_text,
        )
        if result.response is not None:
            reply.response_verdict.CopyFrom(
                await self._verdict("generate.response", result.response, start, result.generate_ms)
            )
        self._record("generate", result.response or result.prompt, prompt)
        return reply

    async def CheckConversation(
        self, request: pb.CheckConversationRequest, context: ServicerContext
    ) -> pb.CheckConversationResponse:
        start = time.perf_counter()
        messages = self._messages("messages", request.messages, for_stream=False)
        session_id = _session_id(request.session_id)
        policy = self._policy(request.policy, context)
        deadline = self._deadline(policy, context)
        result = await check_conversation(
            self._gateway, messages, policy, session_id=session_id,
            owner=caller_key(PRINCIPAL.get(), context), request_id=REQUEST_ID.get(),
            deadline=deadline,
        )  # fmt: skip
        verdict = await self._verdict("check_conversation", result.check, start)
        conversation_verdict_extras(verdict, result)
        driver = result.driver
        logged = messages[driver.index].content if 0 <= driver.index < len(messages) else ""
        self._record("check_conversation", result.check, logged)
        return pb.CheckConversationResponse(
            verdict=verdict, final_text=result.check.final_text if result.is_response else ""
        )

    async def CheckStream(
        self, request_iterator: AsyncIterator[pb.CheckStreamRequest], context: ServicerContext
    ) -> AsyncIterator[pb.CheckStreamResponse]:
        start = time.perf_counter()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("event") != "start":
            raise InvalidArgument(
                "start", "the first message of a stream must be `start` (policy, context, mode)"
            )
        context_messages = self._messages("start.context", first.start.context, for_stream=True)
        policy = self._policy(first.start.policy, context)
        mode = _STREAM_MODES.get(first.start.mode, policy.stream_mode)
        check = StreamCheck(
            self._gateway, policy, mode=mode, context=context_messages,
            request_id=REQUEST_ID.get(), deadline=lambda: self._deadline(policy, context),
        )  # fmt: skip
        limit = self._gateway.config.server.max_text_chars
        event = await check.start()
        index = 0
        while not event.stopped:
            request = await anext(requests, None)
            if request is None:
                event = await check.finish()
                break
            index += 1
            if request.WhichOneof("event") != "chunk":
                raise InvalidArgument(
                    f"requests[{index}]", "only the first message may be `start`; send `chunk`s"
                )
            if len(request.chunk) > limit:
                raise InvalidArgument(
                    f"requests[{index}].chunk",
                    f"is {len(request.chunk):,} characters long; the limit per chunk is {limit:,}",
                )
            event = await check.feed(request.chunk)
            if event.release and not event.stopped:
                yield pb.CheckStreamResponse(release=event.release)
        yield await self._stream_response(event, check, start)
        if event.stopped:  # read what the client still sends, so its writes do not fail
            async for _ in requests:
                pass

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        start = time.perf_counter()
        prompt = self._text("prompt", request.prompt)
        policy = self._policy(request.policy, context)
        mode = _STREAM_MODES.get(request.mode, policy.stream_mode)
        with refused_as_invalid("prompt"):
            async for event in generate_stream(
                self._gateway, prompt, policy, mode=mode, request_id=REQUEST_ID.get(),
                deadline=lambda: self._deadline(policy, context),
            ):  # fmt: skip
                reply = pb.GenerateStreamResponse(
                    release=event.stream.release, stopped=event.stream.stopped,
                    final_text=event.stream.final_text,
                )  # fmt: skip
                if event.prompt is not None:
                    reply.prompt_verdict.CopyFrom(
                        await self._verdict("generate_stream.prompt", event.prompt, start)
                    )
                    if event.stream.stopped:
                        self._record("generate_stream", event.prompt, prompt)
                result = event.stream.result
                if result is not None:
                    verdict = await self._verdict("generate_stream.response", result, start)
                    reply.response_verdict.CopyFrom(
                        conversation_verdict_extras(verdict, stream_mode=mode)
                    )
                    self._record("generate_stream", result, prompt)
                yield reply

    async def _stream_response(
        self, event: StreamEvent, check: StreamCheck, start: float
    ) -> pb.CheckStreamResponse:
        """The last response of a stream: what remains to release, or the stop; the verdict."""
        assert event.result is not None  # the last event carries the decision
        verdict = await self._verdict("check_stream", event.result, start)
        conversation_verdict_extras(verdict, stream_mode=check.mode)
        self._record("check_stream", event.result, check.text)
        return pb.CheckStreamResponse(
            release=event.release, stopped=event.stopped, final_text=event.final_text,
            verdict=verdict,
        )  # fmt: skip

    def _messages(
        self, field: str, messages: Sequence[pb.Message], *, for_stream: bool
    ) -> list[ChatMessage]:
        """The request's messages, validated: roles set, texts within the limit, and
        (for a conversation) something to check."""
        settings = self._gateway.config.conversation
        if len(messages) > settings.max_messages:
            raise InvalidArgument(
                field,
                f"has {len(messages)} messages; the limit is {settings.max_messages}: send the "
                "recent part of the conversation (earlier turns were checked when they were new)",
            )
        out = []
        for i, message in enumerate(messages):
            role = _ROLES.get(message.role)
            if role is None:
                raise InvalidArgument(
                    f"{field}[{i}].role",
                    "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL or ROLE_DOCUMENT",
                )
            # an earlier assistant turn may be empty (e.g. it only called a tool);
            # the answer a conversation check is about may not
            checked_answer = not for_stream and i == len(messages) - 1
            may_be_empty = role is Role.ASSISTANT and not checked_answer
            if may_be_empty and not message.content.strip():
                content = ""
            else:
                content = self._text(f"{field}[{i}].content", message.content)
            out.append(ChatMessage(role, content))
        if not for_stream and not any(m.role in _CHECKED_ROLES for m in out):
            raise InvalidArgument(
                field, "needs at least one user, tool or document message to check"
            )
        return out

    def _record(self, rpc: str, result: CheckResult, text: str) -> None:
        """Append the verdict to the decision log (which the traffic figures count)."""
        self._gateway.decisions.append(
            LoggedDecision(
                request_id=REQUEST_ID.get(), rpc=rpc, policy=result.policy.name,
                decision=result.decision.value, tier=result.decided_by.value,
                route=result.route.route.value, risk_score=result.route.risk_score,
                fallback_reason=result.fail_reason, index_version=result.route.index.version,
                text=text, keep_text=result.policy.record_texts, escalated=result.escalated,
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

    async def _verdict(
        self, rpc: str, result: CheckResult, start: float, generate_ms: float = 0.0
    ) -> pb.Verdict:
        texts = (
            await asyncio.to_thread(exposed_texts, result, self._gateway.index.store)
            if exposes_texts(result)
            else {}
        )
        total_ms = (time.perf_counter() - start) * 1000.0
        self._gateway.metrics.observe(rpc, result, total_ms / 1000.0)
        request_span = current_span()
        if request_span.is_recording():
            request_span.set_attribute("tierguard.request_id", REQUEST_ID.get())
            request_span.set_attribute("tierguard.policy", result.policy.name)
            request_span.set_attribute("tierguard.decision", result.decision.value)
            request_span.set_attribute("tierguard.decided_by", result.decided_by.value)
        verdict = verdict_to_proto(
            result, request_id=REQUEST_ID.get(), total_ms=total_ms,
            exemplar_texts=texts, generate_ms=generate_ms,
        )  # fmt: skip
        log.info(
            "%s request_id=%s policy=%s decision=%s tier=%s risk=%.3f escalated=%s "
            "fallback=%s total_ms=%.1f",
            rpc, verdict.request_id, result.policy.name, result.decision.value,
            result.decided_by.value, result.route.risk_score, result.escalated,
            result.fail_reason or "-", total_ms,
        )  # fmt: skip
        return verdict


_ROLES = {value: key for key, value in ROLES.items()}
_STREAM_MODES = {value: key for key, value in STREAM_MODES.items()}
_CHECKED_ROLES = (Role.USER, Role.TOOL, Role.DOCUMENT)
_MAX_SESSION_ID = 128


def _session_id(session_id: str) -> str:
    """The caller's session id, if it is one we can keep."""
    if len(session_id) > _MAX_SESSION_ID or not session_id.isprintable():
        raise InvalidArgument(
            "session_id",
            f"must be at most {_MAX_SESSION_ID} printable characters (a UUID fits)",
        )
    return session_id


def _metadata(context: ServicerContext, key: str) -> str:
    for entry_key, value in context.invocation_metadata() or ():
        if entry_key == key:
            return str(value)
    return ""
