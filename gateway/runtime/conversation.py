"""Checking a conversation: each message read in its role, risk kept over a session.

What is scored, and how:

- The system prompt is context, never scored as an attack. It is used: a
  response checked with the conversation that repeats it is a leak (see
  `critic.detectors.echoed_spans`).
- The new messages (those after the last assistant message, the assistant's
  answer being checked aside) are scored: a user turn as a prompt; a tool
  result or a document as data, segment by segment (`router.documents`), where
  an instruction addressed to the assistant raises the segment to ESCALATE
  whatever its score. A data segment's score alone escalates it only from
  `data_score_margin` of the way between escalate_at and block_at (a long
  document gives the score many chances to cross the prompt threshold; on
  AgentDojo containers and benign stand-in documents the embedding score added
  2 points of recall for 11 points of benign escalation at the prompt
  threshold). Earlier messages were checked when they were new.
- The recent user turns read together (the session's, or the conversation's
  when the call names no session) are scored as one text, the last two, the
  last three and so on each on their own (a benign turn before an attack split
  in two would dilute it), so an attack split over turns that each look mild
  is seen whole.
- With a `session_id`, the session's risk is the highest of this turn's, the
  combined turns' and its earlier risk decayed per turn; when that reaches the
  policy's `escalate_at` the conversation is escalated even if this turn alone
  looks clean.

The riskiest of these drives the decision, through the same prompt and
response checks as CheckPrompt and CheckResponse (critic modes, fail modes,
records), and the verdict names it. gRPC-free: the servicer adapts it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace

from critic.types import Deadline
from embeddings_index.vocabulary import Role, Route, Tier
from gateway.runtime.app import Gateway
from gateway.runtime.config import Policy
from gateway.runtime.errors import InvalidArgument
from gateway.runtime.pipeline import CheckResult, check_prompt, check_response, route
from router.documents import addressed_instructions, segments
from router.normalize import EmptyAfterNormalization, TextRejected
from router.router import RouteResult

__all__ = [
    "ChatMessage",
    "ConversationResult",
    "DrivingMessage",
    "SessionReport",
    "check_conversation",
]

_ROUTE_ORDER = {Route.ALLOW: 0, Route.ESCALATE: 1, Route.BLOCK: 2}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class DrivingMessage:
    """Where the decision came from.

    Attributes:
        index: The message's position in the conversation.
        role: Its role.
        span: The part of its content (code points, end exclusive) that drove
            the decision; (0, 0) when the whole message did.
        combined_turns: How many recent user turns were read together to drive
            it (0: one message alone).
    """

    index: int
    role: Role
    span: tuple[int, int] = (0, 0)
    combined_turns: int = 0


@dataclass(frozen=True, slots=True)
class SessionReport:
    """A session's risk after this call."""

    session_id: str
    risk_score: float
    turns: int
    combined_risk_score: float


@dataclass(frozen=True)
class ConversationResult:
    """The decision on a conversation, what drove it, and the session's risk."""

    check: CheckResult
    driver: DrivingMessage
    session: SessionReport | None
    is_response: bool


@dataclass(frozen=True)
class _Candidate:
    """A text scored on its own: a message, a segment of one, or the combined user turns."""

    text: str
    driver: DrivingMessage
    addressed: bool = False


async def check_conversation(
    gateway: Gateway,
    messages: list[ChatMessage],
    policy: Policy,
    *,
    session_id: str = "",
    owner: str = "",
    request_id: str,
    deadline: Deadline,
) -> ConversationResult:
    """Decide on a conversation; see the module docstring for what is read how.

    `messages` are validated by the caller (roles set, contents within the size
    limit, at least one message that is not from the system). `owner` is who
    owns `session_id` (sessions of different owners never mix).

    Raises:
        InvalidArgument: a message cannot be checked as sent (it expands past
            the normalisation limits).
    """
    settings = gateway.config.conversation
    is_response = messages[-1].role is Role.ASSISTANT
    history = messages[:-1] if is_response else messages
    system_prompt = "\n\n".join(m.content for m in messages if m.role is Role.SYSTEM)
    last_assistant = max((i for i, m in enumerate(history) if m.role is Role.ASSISTANT), default=-1)
    new = [
        (i, m) for i, m in enumerate(history) if i > last_assistant and m.role is not Role.SYSTEM
    ]
    new_user_turns = [m.content for _, m in new if m.role is Role.USER]
    if session_id:
        turns = gateway.sessions.recent_turns(owner, session_id, new_user_turns)
    else:
        turns = [m.content for m in history if m.role is Role.USER][-settings.session_turns :]

    candidates = [c for i, m in new for c in _candidates(i, m, settings.max_segments)]
    if not candidates:  # nothing new to read (e.g. a system message last): read it all
        candidates = [
            c for i, m in enumerate(history) for c in _candidates(i, m, settings.max_segments)
        ]
    user_indices = [i for i, m in enumerate(history) if m.role is Role.USER]
    if user_indices:
        limit = gateway.config.server.max_text_chars
        candidates += combined_turns(turns, user_indices[-1], max_chars=limit)
    routes = await asyncio.gather(*(_scored(gateway, c, policy) for c in candidates))
    scored = [(c, r) for c, r in zip(candidates, routes, strict=True) if r is not None]

    turn_risk = max((_effective_risk(r) for _, r in scored), default=0.0)
    combined_risk = max(
        (_effective_risk(r) for c, r in scored if c.driver.combined_turns), default=0.0
    )
    session: SessionReport | None = None
    carried = 0.0  # the risk earlier turns of the session pass on to this one
    if session_id:
        carried = gateway.sessions.carried_risk(owner, session_id)
        state = gateway.sessions.record(owner, session_id, new_user_turns, turn_risk)
        session = SessionReport(session_id, state.risk, state.turns, combined_risk)

    chosen, routed = _drive(scored, policy, carried)
    driver = chosen.driver if chosen is not None else DrivingMessage(len(messages) - 1, Role.USER)
    if is_response:
        prompt = next((m.content for m in reversed(history) if m.role is Role.USER), "")
        result = await check_response(
            gateway, prompt, messages[-1].content, policy, request_id=request_id,
            deadline=deadline, routed=routed, system_prompt=system_prompt,
        )  # fmt: skip
        if routed is None or routed.route is Route.ALLOW:
            driver = DrivingMessage(len(messages) - 1, Role.ASSISTANT)
    else:
        if chosen is None:  # every message was empty after normalisation
            raise InvalidArgument(
                "messages", "no message has visible text left after normalisation"
            )
        result = await check_prompt(
            gateway, chosen.text, policy, request_id=request_id, deadline=deadline, routed=routed
        )
    return ConversationResult(result, driver, session, is_response)


def combined_turns(turns: list[str], index: int, *, max_chars: int) -> list[_Candidate]:
    """The last 2, 3, ... of `turns` each read together (a benign turn before an attack
    split in two must not dilute it), driven by the user message at `index`; each text
    keeps its last `max_chars` characters."""
    return [
        _Candidate(
            "\n".join(turns[-count:])[-max_chars:],
            DrivingMessage(index, Role.USER, (0, 0), count),
        )
        for count in range(2, len(turns) + 1)
    ]


def _candidates(index: int, message: ChatMessage, max_segments: int) -> list[_Candidate]:
    """What of one new message is scored: a user turn whole, data by segments."""
    if message.role is Role.USER:
        return [_Candidate(message.content, DrivingMessage(index, Role.USER))]
    if not message.role.is_data:
        return []
    addressed = addressed_instructions(message.content)
    out = []
    for start, end in segments(message.content, max_segments=max_segments):
        hit = any(s < end and e > start for s, e in addressed)
        driver = DrivingMessage(index, message.role, (start, end))
        out.append(_Candidate(message.content[start:end], driver, hit))
    return out


async def _scored(gateway: Gateway, candidate: _Candidate, policy: Policy) -> RouteResult | None:
    """The candidate's route (None when nothing of it is left after normalisation),
    adjusted for what the candidate is: a data segment that addresses the assistant
    is raised to ESCALATE, one escalated by its score alone below the data threshold
    is not; turns read together never block."""
    try:
        routed = await route(gateway, candidate.text, policy)
    except EmptyAfterNormalization:
        return None
    except TextRejected as exc:
        where = candidate.driver
        field = "messages" if where.combined_turns else f"messages[{where.index}].content"
        raise InvalidArgument(field, str(exc)) from exc
    if candidate.driver.combined_turns and routed.route is Route.BLOCK:
        # turns read together may escalate, never block: a block is for what was said now
        return replace(
            routed, route=Route.ESCALATE,
            adjusted_because=(
                f"the last {candidate.driver.combined_turns} user turns read together are "
                "risky (each alone is judged on its own)"
            ),
        )  # fmt: skip
    data = candidate.driver.role.is_data
    if data and not candidate.addressed and _by_score_only(routed):
        threshold = _data_threshold(policy, gateway.config.conversation.data_score_margin)
        if routed.risk_score < threshold:  # many segments, many chances: a higher bar
            return replace(
                routed, route=Route.ALLOW,
                adjusted_because=(
                    f"a segment of {candidate.driver.role.value} data escalates on its score "
                    f"alone only at {threshold:.3f} or above"
                ),
            )  # fmt: skip
    if candidate.addressed and routed.route is not Route.BLOCK:
        # the prefilter's inj.addressed_instruction may have escalated it already; the
        # reason names the message either way, which the rule's id alone does not
        return replace(
            routed, route=Route.ESCALATE,
            adjusted_because=(
                f"an instruction addressed to the assistant inside message "
                f"{candidate.driver.index} ({candidate.driver.role.value} data)"
            ),
        )  # fmt: skip
    return routed


def _by_score_only(routed: RouteResult) -> bool:
    """Escalated by the embedding score alone (no prefilter rule decided or signalled)."""
    return (
        routed.route is Route.ESCALATE and routed.decided_by is Tier.EMBEDDING and not routed.hits
    )


def _data_threshold(policy: Policy, margin: float) -> float:
    """Where a data segment's score alone escalates: `margin` of the way from the
    policy's escalate_at to its block_at."""
    return policy.escalate_at + margin * (policy.block_at - policy.escalate_at)


def _effective_risk(routed: RouteResult) -> float:
    """The risk a candidate passes on to its session: its score, kept below the
    route's escalate_at when the route was lowered to ALLOW (a long document's
    segment below the data threshold must not escalate the next turns)."""
    if routed.route is Route.ALLOW:
        return min(routed.risk_score, math.nextafter(routed.thresholds.escalate_at, 0.0))
    return routed.risk_score


def _drive(
    scored: list[tuple[_Candidate, RouteResult]], policy: Policy, carried_risk: float
) -> tuple[_Candidate | None, RouteResult | None]:
    """The riskiest candidate and its route: the strongest route first, then the highest
    score. When that route is ALLOW but the session's risk carried from earlier turns
    reaches `escalate_at`, the recent turns read together (else the riskiest message)
    are escalated."""
    if not scored:
        return None, None
    candidate, routed = max(scored, key=lambda cr: (_ROUTE_ORDER[cr[1].route], cr[1].risk_score))
    if routed.route is Route.ALLOW and carried_risk > 0.0 and carried_risk >= policy.escalate_at:
        combined = [(c, r) for c, r in scored if c.driver.combined_turns]
        if combined:
            candidate, routed = max(combined, key=lambda cr: cr[1].risk_score)
        routed = replace(
            routed, route=Route.ESCALATE,
            adjusted_because=(
                f"the session's risk {carried_risk:.3f} is at or above escalate_at "
                f"{policy.escalate_at:.3f}"
            ),
        )  # fmt: skip
    return candidate, routed
