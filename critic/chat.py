"""One OpenAI-compatible chat endpoint, called the way a production gateway must.

Per-call timeouts bounded by the caller's deadline; retries with exponential
backoff and full jitter on 429, 5xx, timeouts and dropped connections
(honouring Retry-After); a fallback through response formats an endpoint
refuses (json_schema -> json_object -> plain text), remembered once learned.
Every failure becomes `CriticUnavailable(reason)`. Shared by the critic and
the upstream generator, which may also stream (`ChatEndpoint.stream`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from critic.types import CriticUnavailable, Deadline, Usage

__all__ = ["FORMATS", "ChatEndpoint", "ChatStream", "LLMSettings"]

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "text")
_MIN_CALL_S = 0.05


@dataclass(frozen=True)
class LLMSettings:
    """How to reach and pace an OpenAI-compatible model.

    Attributes:
        model: Model name sent to the endpoint.
        base_url: Endpoint; None lets the SDK read OPENAI_BASE_URL (else api.openai.com).
        api_key: Key; None lets the SDK read OPENAI_API_KEY.
        call_timeout_s: Longest one HTTP call may take (the deadline may cut it shorter).
        max_retries: Retries of a call after 429, 5xx, timeouts or dropped connections.
        backoff_base_s: First backoff; doubles per retry, with full jitter.
        backoff_max_s: Longest backoff.
        circuit_failures: Consecutive failed judgements that open the circuit.
        circuit_reset_s: How long the circuit stays open before one trial call.
        price_prompt_per_1m_usd: Price of a million prompt tokens, for cost accounting.
        price_completion_per_1m_usd: Price of a million completion tokens.
        max_completion_tokens: Cap on the model's answer.
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = None
    call_timeout_s: float = 10.0
    max_retries: int = 2
    backoff_base_s: float = 0.2
    backoff_max_s: float = 2.0
    circuit_failures: int = 5
    circuit_reset_s: float = 30.0
    price_prompt_per_1m_usd: float = 0.15
    price_completion_per_1m_usd: float = 0.60
    max_completion_tokens: int = 1500

    def __post_init__(self) -> None:
        """Refuse pairs no endpoint could work with; the message names the field."""
        if not self.model:
            raise ValueError("model must name a model")
        if self.call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be more than 0: every call would time out")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be at least backoff_base_s")
        if self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens must be at least 1")


class ChatEndpoint:
    """Chat completions with retries, backoff, deadlines and format fallback."""

    def __init__(self, settings: LLMSettings, *, client: openai.AsyncOpenAI | None = None) -> None:
        self.settings = settings
        self._client = client or openai.AsyncOpenAI(
            api_key=settings.api_key or None, base_url=settings.base_url or None, max_retries=0
        )
        self._format = 0  # index into FORMATS: the richest the endpoint accepts

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.close()

    async def complete(
        self,
        messages: list[dict[str, str]],
        deadline: Deadline,
        *,
        json_schema: dict[str, Any] | None = None,
        temperature: float = 0.0,
    ) -> tuple[str, Usage]:
        """The model's answer and its usage.

        Args:
            json_schema: Ask for JSON of this schema (falling back as the endpoint
                requires); None asks for plain text.
        """
        attempt = 0
        while True:
            remaining = deadline.remaining()
            if remaining < _MIN_CALL_S:
                raise CriticUnavailable("deadline", "no time left before the caller's deadline")
            try:
                response = await self._client.chat.completions.create(
                    model=self.settings.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=temperature,
                    max_completion_tokens=self.settings.max_completion_tokens,
                    timeout=min(self.settings.call_timeout_s, remaining),
                    **self._format_kwargs(json_schema),
                )
            except openai.BadRequestError as exc:
                if json_schema is not None and self._format < len(FORMATS) - 1:
                    self._format += 1
                    log.info(
                        "endpoint refused a response format; now using %s", FORMATS[self._format]
                    )
                    continue
                raise _refused(exc, self.settings.model) from exc
            except _REFUSALS as exc:
                raise _refused(exc, self.settings.model) from exc
            except (
                openai.APITimeoutError,
                openai.APIConnectionError,
                openai.APIStatusError,
            ) as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            choice = response.choices[0] if response.choices else None
            content = (choice.message.content or "") if choice is not None else ""
            return content, self._usage(response)

    def stream(
        self, messages: list[dict[str, str]], deadline: Deadline, *, temperature: float = 0.0
    ) -> ChatStream:
        """The model's plain-text answer as it is generated: iterate for content deltas.

        Nothing is sent until the first iteration. Failures before the first delta
        are retried like `complete`'s; after it, none are (a retry would repeat
        text). The deadline bounds the whole stream. See `ChatStream`.
        """
        return ChatStream(self, messages, deadline, temperature)

    def _retry_delay(self, exc: openai.APIError, attempt: int, deadline: Deadline) -> float:
        """The backoff before retrying after `exc`; raises when no retry is allowed."""
        reason, retry_after = _classify(exc)
        delay = self._backoff(attempt, retry_after)
        if (
            reason == "api_error"
            or attempt >= self.settings.max_retries
            or deadline.remaining() - delay < _MIN_CALL_S
        ):
            raise CriticUnavailable(reason, f"model call failed: {reason}") from exc
        return delay

    def _format_kwargs(self, json_schema: dict[str, Any] | None) -> dict[str, Any]:
        if json_schema is None:
            return {}
        mode = FORMATS[self._format]
        if mode == "json_schema":
            spec = {"name": "critique", "schema": json_schema, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": spec}}
        if mode == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {}

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2**attempt)
        delay = random.uniform(0, cap)
        if retry_after:
            return max(delay, min(retry_after, self.settings.backoff_max_s))
        return delay

    def _usage(self, response: Any) -> Usage:
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = (
            prompt_tokens * self.settings.price_prompt_per_1m_usd
            + completion_tokens * self.settings.price_completion_per_1m_usd
        ) / 1e6
        return Usage(1, prompt_tokens, completion_tokens, cost)


class ChatStream(AsyncIterator[str]):
    """A streamed chat completion: an async iterator of non-empty content deltas.

    `usage` is None while the stream runs and is set once it has ended normally
    (from the endpoint's final usage chunk; zero tokens if it sent none). It lives
    on this object, not on the endpoint, so concurrent streams cannot mix usage.
    Iterating raises `CriticUnavailable` (reason "deadline", "timeout",
    "connection", "server_error", ...) on failure. Use `async with` (or `aclose`)
    to release the connection when you stop reading early.
    """

    def __init__(
        self,
        endpoint: ChatEndpoint,
        messages: list[dict[str, str]],
        deadline: Deadline,
        temperature: float,
    ) -> None:
        self.usage: Usage | None = None
        self._endpoint = endpoint
        self._messages = messages
        self._deadline = deadline
        self._temperature = temperature
        self._deltas = self._run()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and release its connection."""
        await self._deltas.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[str, None]:
        endpoint, deadline = self._endpoint, self._deadline
        settings = endpoint.settings
        attempt = 0
        started = False  # a delta has been yielded: no more retries
        while True:
            stream: openai.AsyncStream[ChatCompletionChunk] | None = None
            try:
                remaining = deadline.remaining()
                if remaining < _MIN_CALL_S:
                    raise CriticUnavailable("deadline", "no time left before the caller's deadline")
                # The SDK's timeout bounds each read (a stalled stream); the deadline,
                # enforced around every await (never across a yield), bounds the whole.
                async with asyncio.timeout(remaining):
                    stream = await endpoint._client.chat.completions.create(
                        model=settings.model,
                        messages=cast(list[ChatCompletionMessageParam], self._messages),
                        temperature=self._temperature,
                        max_completion_tokens=settings.max_completion_tokens,
                        timeout=min(settings.call_timeout_s, remaining),
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                final: ChatCompletionChunk | None = None
                while True:
                    async with asyncio.timeout(max(deadline.remaining(), 0.0)):
                        try:
                            chunk = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                    if chunk.usage is not None:
                        final = chunk
                    choice = chunk.choices[0] if chunk.choices else None
                    content = choice.delta.content if choice is not None else None
                    if content:
                        started = True
                        yield content
                self.usage = endpoint._usage(final)
                return
            except TimeoutError as exc:
                raise CriticUnavailable(
                    "deadline", "the stream outlasted the caller's deadline"
                ) from exc
            except (openai.BadRequestError, *_REFUSALS) as exc:
                raise _refused(exc, settings.model) from exc
            except openai.APIError as exc:
                if started:
                    reason, _ = _classify(exc)
                    raise CriticUnavailable(
                        reason, f"model stream failed after it began: {reason}"
                    ) from exc
                delay = endpoint._retry_delay(exc, attempt, deadline)
            finally:
                if stream is not None:
                    await stream.close()
            attempt += 1
            await asyncio.sleep(delay)


# Answers that retrying cannot change (a bad request is also retried in another format).
_REFUSALS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


def _refused(exc: openai.APIStatusError, model: str) -> CriticUnavailable:
    """The endpoint refused the call for good: a bad request, a rejected key, no such model."""
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return CriticUnavailable("auth", "the endpoint rejected the API key")
    if isinstance(exc, openai.NotFoundError):
        return CriticUnavailable("not_found", f"model {model!r} not found")
    return CriticUnavailable("bad_request", f"the endpoint refused the call: {exc}")


def _classify(exc: openai.APIError) -> tuple[str, float | None]:
    """A reason word for a transport failure, and the server's Retry-After if any."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, openai.APIStatusError):
        header = exc.response.headers.get("retry-after") if exc.response is not None else None
        try:
            retry_after = float(header) if header else None
        except ValueError:
            retry_after = None
        if exc.status_code == 429:
            return "rate_limited", retry_after
        if exc.status_code >= 500:
            return "server_error", retry_after
    return "api_error", None
