"""The LLM critic: any OpenAI-compatible endpoint through the `openai` SDK.

It asks for the fixed JSON verdict with a JSON schema, falling back to
`json_object` and then to tolerant parsing when an endpoint refuses the format
(see `critic.chat`). The user's text and the draft travel as data between
marker lines carrying a random boundary made for each call, so a draft cannot
close its own fence.

On top of the endpoint's timeouts and retries: one retry of a malformed
answer, and a circuit breaker that fails fast while the endpoint is down.
Every failure becomes `CriticUnavailable(reason)`; the loop turns it into the
policy's fail mode.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from critic.chat import ChatEndpoint, LLMSettings
from critic.constitution import Constitution, Rule, Target
from critic.types import CriticUnavailable, Critique, Deadline, Usage
from embeddings_index.vocabulary import CriticKind

__all__ = ["CircuitBreaker", "LLMCritic", "parse_critique"]

log = logging.getLogger(__name__)

_PROMPTS = Path(__file__).resolve().parent / "prompts"
_KEYS = ("violates_rules", "violated_rules", "explanation", "revised_response")


class CircuitBreaker:
    """Fails fast while the endpoint is down, and always finds out when it is back.

    Closed: every call goes out; `failures` consecutive failures open the circuit.
    Open: calls fail fast for `reset_s`; then the circuit is half-open and lets
    one trial call out at a time. Every call `allow()` admits must end in
    exactly one `record(ok)` or `release()` (`LLMCritic.critique` does so in a
    `finally`):

    - `record(ok=True)` closes the circuit; `record(ok=False)` counts a failure
      and, once open, reopens it for a fresh `reset_s`.
    - `release()` ends a call that learnt nothing of the endpoint's health
      (cancelled, or cut by the caller's deadline). It frees the trial slot and
      leaves the circuit as it is, so the next request tries at once: reopening
      instead would let a run of short-deadline callers keep a healthy endpoint
      shut out, and counting it a success would close the circuit unproven.
    - A trial that never reports (its task lost) holds the slot for at most
      `lease_s`; then another trial may go out. Nothing can keep the circuit
      open for ever once the endpoint is healthy.

    A call admitted while closed, or a trial whose lease ran out, may still
    report late: its outcome counts (it is real evidence about the endpoint);
    at worst one extra trial goes out. Not thread-safe: one event loop uses it.

    Args:
        failures: Consecutive failures that open the circuit.
        reset_s: How long an open circuit fails fast before a trial.
        lease_s: Longest a trial may hold the half-open slot without reporting;
            set it above the longest a call can take (LLMCritic does).
        clock: Monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._lease_s = lease_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_until: float | None = None  # the running trial's lease expiry

    @property
    def is_open(self) -> bool:
        """True while calls should fail fast."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go out now (a half-open circuit lets one trial through)."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self._reset_s:
            return False
        if self._trial_until is not None:
            if now < self._trial_until:
                return False
            log.warning(
                "critic circuit trial never reported within %.1fs; trying again", self._lease_s
            )
        self._trial_until = now + self._lease_s
        return True

    def record(self, ok: bool) -> None:
        """End an admitted call whose outcome says whether the endpoint is healthy."""
        self._trial_until = None
        if ok:
            if self._opened_at is not None:
                log.info("critic circuit closed: the endpoint answered again")
            self._consecutive, self._opened_at = 0, None
            return
        self._consecutive += 1
        if self._consecutive >= self._threshold:
            if self._opened_at is None:
                log.warning("critic circuit open after %d consecutive failures", self._consecutive)
            self._opened_at = self._clock()

    def release(self) -> None:
        """End an admitted call that learnt nothing of the endpoint's health: free the trial."""
        self._trial_until = None


class LLMCritic:
    """A `Critic` backed by a chat-completions endpoint."""

    def __init__(self, settings: LLMSettings, *, client: openai.AsyncOpenAI | None = None) -> None:
        self._settings = settings
        self._endpoint = ChatEndpoint(settings, client=client)
        # a trial unheard of for a reset interval and a whole call timeout is presumed lost
        self._breaker = CircuitBreaker(
            settings.circuit_failures,
            settings.circuit_reset_s,
            lease_s=max(settings.circuit_reset_s, settings.call_timeout_s),
        )
        self._templates = {
            name: string.Template((_PROMPTS / f"{name}.txt").read_text(encoding="utf-8"))
            for name in ("critique_response", "critique_prompt", "data_response", "data_prompt")
        }

    @property
    def kind(self) -> CriticKind:
        return CriticKind.LLM

    @property
    def model(self) -> str:
        return self._settings.model

    @property
    def circuit_open(self) -> bool:
        """True while the endpoint is considered down."""
        return self._breaker.is_open

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._endpoint.aclose()

    async def critique(
        self,
        *,
        target: Target,
        prompt: str,
        draft: str,
        constitution: Constitution,
        deadline: Deadline,
    ) -> Critique:
        """Judge through the endpoint, failing fast while the circuit is open.

        Every way out of an admitted call tells the breaker how it ended (the
        `finally`), so a half-open trial can never be left holding the circuit:
        a judgement is a success; an endpoint failure, garbage twice, or any
        unexpected exception is a failure; the caller's deadline or a
        cancellation (`asyncio.CancelledError`) says nothing of the endpoint's
        health and only releases the call.

        Raises:
            CriticUnavailable: the circuit is open, or no judgement could be had.
        """
        if not self._breaker.allow():
            raise CriticUnavailable("circuit_open", "the critic endpoint is failing; circuit open")
        healthy: bool | None = None  # None: the call ended without a verdict on the endpoint
        try:
            critique = await self._judge(target, prompt, draft, constitution, deadline)
            healthy = True
            return critique
        except CriticUnavailable as exc:
            # a caller's short deadline says nothing about the endpoint's health
            healthy = None if exc.reason == "deadline" else False
            raise
        except Exception:
            healthy = False
            raise
        finally:
            if healthy is None:
                self._breaker.release()
            else:
                self._breaker.record(ok=healthy)

    async def _judge(
        self,
        target: Target,
        prompt: str,
        draft: str,
        constitution: Constitution,
        deadline: Deadline,
    ) -> Critique:
        """One judgement: ask, and ask once more if the answer is malformed."""
        messages = self._messages(target, prompt, draft, constitution)
        rules = constitution.rules_for(target)
        usage = Usage()
        for attempt in range(2):  # a malformed answer is retried once
            content, call_usage = await self._endpoint.complete(
                messages, deadline, json_schema=_schema(rules)
            )
            usage += call_usage
            try:
                critique = parse_critique(content, rules)
            except ValueError as exc:
                log.warning("critic answer malformed (attempt %d): %s", attempt + 1, exc)
                continue
            return Critique(
                critique.violates,
                critique.violated_rules,
                critique.explanation,
                critique.revised_response if target is Target.RESPONSE else "",
                critique.notes,
                usage,
            )
        raise CriticUnavailable("malformed_output", "the critic answered with malformed JSON twice")

    def _messages(
        self, target: Target, prompt: str, draft: str, constitution: Constitution
    ) -> list[dict[str, str]]:
        boundary = secrets.token_hex(12)
        while boundary in prompt or boundary in draft:  # pragma: no cover - 96 random bits
            boundary = secrets.token_hex(12)
        kind = "response" if target is Target.RESPONSE else "prompt"
        values = {
            "constitution": constitution.label,
            "rules": _describe_rules(constitution.rules_for(target)),
            "boundary": boundary,
            "prompt": prompt,
            "draft": draft,
        }
        return [
            {"role": "system", "content": self._templates[f"critique_{kind}"].substitute(values)},
            {"role": "user", "content": self._templates[f"data_{kind}"].substitute(values)},
        ]


def _schema(rules: tuple[Rule, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "violates_rules": {"type": "boolean"},
            "violated_rules": {
                "type": "array",
                "items": {"type": "string", "enum": [r.id for r in rules]},
            },
            "explanation": {"type": "string"},
            "revised_response": {"type": "string"},
        },
        "required": list(_KEYS),
        "additionalProperties": False,
    }


def _describe_rules(rules: tuple[Rule, ...]) -> str:
    lines = []
    for rule in rules:
        lines.append(f"- [{rule.id}] ({rule.severity.value}) {rule.text}")
        for example in rule.examples:
            verdict = "violates" if example.violates else "complies"
            lines.append(f"    example ({verdict}): {json.dumps(example.text, ensure_ascii=False)}")
    return "\n".join(lines)


def parse_critique(content: str, rules: tuple[Rule, ...]) -> Critique:
    """Read the critic's JSON answer, tolerating code fences and chatter around it.

    Unknown rule ids are dropped and noted. An answer that names broken rules
    while saying it violates none is read as a violation (fail safe).

    Raises:
        ValueError: no JSON object with the four keys and their types.
    """
    data = _first_json_object(content)
    if not isinstance(data.get("violates_rules"), bool):
        raise ValueError("'violates_rules' must be true or false")
    named = data.get("violated_rules", [])
    if not isinstance(named, list) or not all(isinstance(x, str) for x in named):
        raise ValueError("'violated_rules' must be a list of rule ids")
    explanation = data.get("explanation", "")
    revised = data.get("revised_response", "")
    if not isinstance(explanation, str) or not isinstance(revised, str):
        raise ValueError("'explanation' and 'revised_response' must be strings")
    known = {r.id for r in rules}
    notes = [f"dropped unknown rule id {rule_id!r}" for rule_id in named if rule_id not in known]
    violated = tuple(dict.fromkeys(rule_id for rule_id in named if rule_id in known))
    violates = data["violates_rules"] or bool(violated)
    if violated and not data["violates_rules"]:
        notes.append("critic named broken rules but said none were broken; read as a violation")
    return Critique(violates, violated, explanation.strip(), revised.strip(), tuple(notes))


def _first_json_object(content: str) -> dict[str, Any]:
    decoder = json.JSONDecoder()
    start = content.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(content, start)
        except json.JSONDecodeError:
            start = content.find("{", start + 1)
            continue
        if isinstance(value, dict) and "violates_rules" in value:
            return value
        start = content.find("{", start + 1)
    raise ValueError("no JSON object with the critique keys in the answer")
