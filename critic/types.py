"""The critic tier's shared vocabulary: critiques, usage, deadlines, and its one error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from critic.constitution import Constitution, Target
from embeddings_index.vocabulary import CriticKind

__all__ = ["Critic", "CriticKind", "CriticUnavailable", "Critique", "Deadline", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Model calls, tokens and cost, for one request or in total."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class Critique:
    """One critic call's judgement, in the fixed JSON shape the critic answers with.

    Attributes:
        violates: Whether the judged text breaks a rule.
        violated_rules: Ids of the broken rules (unknown ids already dropped).
        explanation: The critique, in the critic's words.
        revised_response: A compliant rewrite of the draft; "" if none.
        notes: What the gateway corrected in the answer (dropped ids, ...).
        usage: Calls, tokens and cost of this judgement.
    """

    violates: bool
    violated_rules: tuple[str, ...]
    explanation: str
    revised_response: str = ""
    notes: tuple[str, ...] = ()
    usage: Usage = field(default_factory=Usage)


class CriticUnavailable(Exception):
    """The critic could not judge in time (timeout, errors, open circuit, garbage output).

    `reason` is a short machine-readable word that verdicts carry, such as
    "timeout", "rate_limited", "server_error", "malformed_output",
    "circuit_open", "deadline" or "not_judged".
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Deadline:
    """A point in time (monotonic clock) by which the critic tier must have answered."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    @classmethod
    def at(cls, monotonic_time: float) -> Deadline:
        """A deadline at an absolute monotonic time."""
        deadline = cls(0.0)
        deadline._at = monotonic_time
        return deadline

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self._at - time.monotonic()


class Critic(Protocol):
    """Judges a prompt (or a draft answer to it) against a constitution."""

    @property
    def kind(self) -> CriticKind:
        """`llm` or `local`."""
        ...

    @property
    def model(self) -> str:
        """The model that answers ("" for the local critic)."""
        ...

    async def critique(
        self,
        *,
        target: Target,
        prompt: str,
        draft: str,
        constitution: Constitution,
        deadline: Deadline,
    ) -> Critique:
        """Judge `draft` (target RESPONSE) or `prompt` (target PROMPT).

        Raises:
            CriticUnavailable: no judgement could be had before the deadline.
        """
        ...
