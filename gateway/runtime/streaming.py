"""Checking an answer while it streams: windows with carry-over, three release modes.

The output detectors (secrets, keys, schemas, system-prompt echoes) run on
every chunk over the new text plus the last `overlap_chars` already checked,
so a pattern split across chunks is seen whole. When the prompt is risky (the
router escalated the context's last user turn) the critic reviews the answer
so far once per `window_chars` of new text, and once more at the end; a
benign prompt's stream never waits for a model.

Modes (`StreamMode`):

- `hold_back`: text is released only once the checks that cover it passed,
  less the last `overlap_chars`, which wait for what follows (a secret's
  first half must not go out before its second half arrives). On a violation
  nothing more is released: the stream stops with the safe reply.
- `stream_first`: each chunk is released as soon as the detectors passed it
  (microseconds); the critic's review comes after. A violation stops the
  stream with the safe reply, which replaces what was shown.
- `audit`: every chunk is released at once and the stream is never stopped;
  the final verdict says what was found.

gRPC-free: the servicer feeds it chunks and sends what it returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from critic.constitution import Target
from critic.detectors import DetectorHit, detect
from critic.loop import Outcome, review_response
from critic.types import CriticUnavailable, Deadline
from embeddings_index.vocabulary import CriticMode, Decision, Role, Route, StreamMode, Tier
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from gateway.runtime.conversation import ChatMessage
from gateway.runtime.errors import InvalidArgument
from gateway.runtime.pipeline import (
    CheckResult,
    check_prompt,
    generator_failed,
    generator_not_configured,
    record_outcome,
    route,
)
from gateway.runtime.tracing import span
from router.normalize import EmptyAfterNormalization, NormalizedText
from router.router import RouteResult

__all__ = ["GeneratedEvent", "StreamCheck", "StreamEvent", "generate_stream"]


@dataclass(frozen=True)
class StreamEvent:
    """What the caller may do now.

    Attributes:
        release: Text it may show now (after everything released before).
        stopped: The stream is stopped: show `final_text` in place of the answer.
        final_text: The text to show when stopped (the safe reply).
        result: The decision; set when the stream ends or is stopped.
    """

    release: str = ""
    stopped: bool = False
    final_text: str = ""
    result: CheckResult | None = None


@dataclass
class _Findings:
    hits: dict[tuple[str, tuple[int, int]], DetectorHit] = field(default_factory=dict)
    outcome: Outcome | None = None  # the critic's last review
    violation: str = ""  # why the stream was (or, in audit mode, would have been) stopped


class StreamCheck:
    """One streamed answer under one policy; feed it chunks in order, then finish it."""

    def __init__(
        self,
        gateway: Gateway,
        policy: Policy,
        *,
        mode: StreamMode,
        context: list[ChatMessage],
        request_id: str,
        deadline: Callable[[], Deadline],
    ) -> None:
        """`deadline` gives the critic's deadline for a review starting now (a
        stream may outlast any one budget)."""
        self._gateway = gateway
        self._policy = policy
        self.mode = mode
        self._settings = gateway.config.stream
        self._constitution = gateway.constitution(policy)
        self._system_prompt = "\n\n".join(m.content for m in context if m.role is Role.SYSTEM)
        self._prompt = next((m.content for m in reversed(context) if m.role is Role.USER), "")
        self._request_id = request_id
        self._deadline = deadline
        self._routed: RouteResult | None = None
        self._out = ""
        self._released = 0
        self._checked = 0  # the detectors have read the output up to here
        self._reviewed = 0  # the critic has approved the output up to here
        self._found = _Findings()
        self._done = False

    @property
    def text(self) -> str:
        """The output received so far."""
        return self._out

    async def start(self) -> StreamEvent:
        """Route the context's prompt; a blocked prompt stops the stream before any output."""
        if self._prompt:
            try:
                self._routed = await route(self._gateway, self._prompt, self._policy)
            except EmptyAfterNormalization:
                self._routed = None
        if self._routed is not None and self._routed.route is Route.BLOCK:
            self._found.violation = f"the prompt is blocked ({self._routed.reason})"
            if self.mode is not StreamMode.AUDIT:
                return self._stop(self._routed.decided_by)
        return StreamEvent()

    async def feed(self, chunk: str) -> StreamEvent:
        """Take the next piece of output; what may be released now, or the stop."""
        if self._done:
            return StreamEvent()
        if len(self._out) + len(chunk) > self._settings.max_chars:
            raise InvalidArgument(
                "chunk",
                f"the stream is longer than stream.max_chars ({self._settings.max_chars:,} "
                "characters): check the answer in parts",
            )
        self._out += chunk
        if self._scan() and self.mode is not StreamMode.AUDIT:
            return self._stop(Tier.CRITIC)
        immediate = self.mode is not StreamMode.HOLD_BACK
        release = self._release_upto(len(self._out)) if immediate else ""
        window_full = len(self._out) - self._reviewed >= self._settings.window_chars
        if (
            self._risky
            and window_full
            and await self._review()
            and self.mode is not StreamMode.AUDIT
        ):
            return self._stop(Tier.CRITIC, release)
        if not immediate:
            safe = len(self._out) if not self._risky else self._reviewed
            release = self._release_upto(safe - self._settings.overlap_chars)
        return StreamEvent(release=release)

    async def finish(self) -> StreamEvent:
        """The output is complete: the last checks, the rest released if it passes, the verdict."""
        if self._done:
            return StreamEvent()
        unreviewed = self._reviewed < len(self._out) and not self._found.violation
        if (
            self._risky
            and unreviewed
            and await self._review()
            and self.mode is not StreamMode.AUDIT
        ):
            return self._stop(Tier.CRITIC)
        self._done = True
        release = self._release_upto(len(self._out))
        return StreamEvent(release=release, result=self._result())

    @property
    def _risky(self) -> bool:
        return self._routed is not None and self._routed.route is Route.ESCALATE

    def _scan(self) -> bool:
        """Run the detectors over the new text and the carry-over; True on a new hit."""
        begin = max(0, self._checked - self._settings.overlap_chars)
        found = False
        for hit in detect(
            self._out[begin:], self._constitution, target=Target.RESPONSE,
            system_prompt=self._system_prompt,
        ):  # fmt: skip
            span = (hit.span[0] + begin, hit.span[1] + begin)
            seen = any(  # found before, in the carried-over text
                rule == hit.rule_id and start <= span[0] < end
                for rule, (start, end) in self._found.hits
            )
            if not seen:
                self._found.hits[hit.rule_id, span] = DetectorHit(
                    hit.detector, hit.rule_id, hit.severity, span
                )
                found = True
        self._checked = len(self._out)
        if found and not self._found.violation:
            self._found.violation = f"an output detector matched ({', '.join(self._rules)})"
        return found

    @property
    def _rules(self) -> list[str]:
        """The rules the detectors found broken, in the order found."""
        return list(dict.fromkeys(rule for rule, _ in self._found.hits))

    async def _review(self) -> bool:
        """The critic's review of the output so far (the prompt is risky); True if it fails."""
        critic = (
            self._gateway.critic
            if self._policy.critic_mode is CriticMode.SYNC
            else self._gateway.local_critic
        )
        with span(self._gateway.tracer, "critic", target="stream", critic=critic.kind.value):
            outcome = await review_response(
                prompt=self._prompt, draft=self._out, constitution=self._constitution,
                critic=critic, deadline=self._deadline(), max_rounds=0,
                fail_mode=self._policy.fail_mode, needs_judgement=True,
                system_prompt=self._system_prompt,
            )  # fmt: skip
        await record_outcome(
            self._gateway, self._policy, self._request_id, Target.RESPONSE, "stream",
            self._prompt, self._out, outcome,
        )  # fmt: skip
        self._found.outcome = outcome
        self._reviewed = len(self._out)  # each window is reviewed once, whatever the outcome
        if outcome.verdict is Decision.ALLOW:
            return False
        if not self._found.violation:
            self._found.violation = f"the critic decided {outcome.verdict.value}" + (
                f" ({outcome.fail_reason})" if outcome.fail_reason else ""
            )
        return True

    def _release_upto(self, end: int) -> str:
        end = min(end, len(self._out))
        if end <= self._released:
            return ""
        text = self._out[self._released : end]
        self._released = end
        return text

    def _stop(self, tier: Tier, release: str = "") -> StreamEvent:
        self._done = True
        safe = self._constitution.safe_reply_for(self._rules)
        return StreamEvent(
            release=release, stopped=True, final_text=safe, result=self._result(tier)
        )

    def _result(self, tier: Tier | None = None) -> CheckResult:
        routed = self._routed or _unrouted(self._gateway, self._policy)
        outcome = self._found.outcome
        rules = self._rules
        if outcome is not None:
            rules = list(dict.fromkeys([*rules, *outcome.violated_rules]))
        if self._found.violation:
            decision = Decision.BLOCK
            reason = (
                f"{self._found.violation} (audit mode: not enforced)"
                if self.mode is StreamMode.AUDIT
                else f"{self._found.violation}; the stream was stopped"
            )
        else:
            decision = Decision.ALLOW
            reason = (
                f"{routed.reason}; the critic reviewed the stream"
                if outcome is not None
                else f"{routed.reason} and no output detector matched the stream"
            )
        fail_reason = outcome.fail_reason if outcome is not None else ""
        return CheckResult(
            decision=decision,
            decided_by=tier or (Tier.CRITIC if outcome or self._found.hits else Tier.EMBEDDING),
            route=routed, policy=self._policy, constitution=self._constitution, reason=reason,
            escalated=outcome is not None, outcome=outcome, fail_reason=fail_reason,
            final_text=self._out if decision is Decision.ALLOW else self._constitution.safe_reply,
            violated_rules=tuple(rules),
        )  # fmt: skip


@dataclass(frozen=True)
class GeneratedEvent:
    """One step of a streamed Generate: the prompt's decision (first), then the answer's."""

    prompt: CheckResult | None = None
    stream: StreamEvent = field(default_factory=StreamEvent)


async def generate_stream(
    gateway: Gateway,
    prompt: str,
    policy: Policy,
    *,
    mode: StreamMode,
    request_id: str,
    deadline: Callable[[], Deadline],
) -> AsyncIterator[GeneratedEvent]:
    """Check the prompt, stream the upstream model's answer through a `StreamCheck`.

    The first event carries the prompt's decision; a blocked prompt is also the
    last (stopped, with the safe reply) and nothing is generated. The upstream
    stream is closed as soon as the check stops it.

    Raises:
        FailedPrecondition: no upstream generator is configured.
        Unavailable: the upstream model failed (before or during its answer).
    """
    generator = gateway.generator
    if generator is None:
        raise generator_not_configured()
    checked = await check_prompt(
        gateway, prompt, policy, request_id=request_id, deadline=deadline()
    )
    if checked.decision is Decision.BLOCK:
        safe = checked.constitution.safe_reply
        yield GeneratedEvent(checked, StreamEvent(stopped=True, final_text=safe))
        return
    yield GeneratedEvent(checked)
    context = [ChatMessage(Role.SYSTEM, generator.system_prompt), ChatMessage(Role.USER, prompt)]
    check = StreamCheck(
        gateway, policy, mode=mode, context=context, request_id=request_id, deadline=deadline
    )
    event = await check.start()
    if event.stopped:
        yield GeneratedEvent(stream=event)
        return
    upstream = generator.generate_stream(prompt, deadline())
    try:
        async for delta in upstream:
            event = await check.feed(delta)
            if event.stopped:
                yield GeneratedEvent(stream=event)
                return
            if event.release:
                yield GeneratedEvent(stream=event)
    except CriticUnavailable as exc:
        raise generator_failed(exc) from exc
    finally:
        await upstream.aclose()
    yield GeneratedEvent(stream=await check.finish())


def _unrouted(gateway: Gateway, policy: Policy) -> RouteResult:
    """The route of a stream whose context has no user prompt: nothing was scored."""
    return RouteResult(
        route=Route.ALLOW, decided_by=Tier.EMBEDDING, risk_score=0.0,
        thresholds=policy.thresholds, normalized=NormalizedText("", ""), hits=(),
        neighbors=None, index=gateway.index.index,
        adjusted_because="no user prompt in the stream's context to score",
    )  # fmt: skip
