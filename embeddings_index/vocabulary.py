"""The words every tier shares, as enums: one definition each, used everywhere.

It lives in `embeddings_index`, the package at the root of the dependency
graph (gateway -> router, critic -> embeddings_index), so that every package
can import it. The enums are `StrEnum`s: their values are what the SQLite
files, JSON exports and logs hold, so a stored string compares equal to its
member and a member formats as its value.
"""

from __future__ import annotations

import enum

__all__ = [
    "AddStatus",
    "CriticKind",
    "CriticMode",
    "Decision",
    "FailMode",
    "Label",
    "Role",
    "Route",
    "StreamMode",
    "Tier",
]


class Label(enum.StrEnum):
    """What a labelled text or an exemplar is."""

    RISKY = "risky"
    BENIGN = "benign"


class Route(enum.StrEnum):
    """Where the router sends a text."""

    ALLOW = "allow"
    ESCALATE = "escalate"
    BLOCK = "block"


class Decision(enum.StrEnum):
    """What the caller should do with a text: the gateway's answer and the critic's."""

    ALLOW = "allow"
    REVISE = "revise"
    BLOCK = "block"


class Tier(enum.StrEnum):
    """The tier that made a decision, in the order a request meets them."""

    PREFILTER = "prefilter"
    EMBEDDING = "embedding"
    CRITIC = "critic"


class CriticKind(enum.StrEnum):
    """Which critic answered."""

    LLM = "llm"
    LOCAL = "local"


class CriticMode(enum.StrEnum):
    """How a policy runs the critic tier."""

    SYNC = "sync"  # the caller waits for the critic
    SHADOW = "shadow"  # the caller gets the fail mode at once; the critic runs and is recorded
    OFF = "off"  # escalations are resolved by the fail mode


class FailMode(enum.StrEnum):
    """What a policy answers when the critic cannot judge."""

    CLOSED = "closed"  # BLOCK
    OPEN = "open"  # ALLOW, flagged


class AddStatus(enum.StrEnum):
    """What happened to one exemplar of a checked add."""

    ADDED = "added"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"


class Role(enum.StrEnum):
    """Who wrote a message of a conversation; decides how it is read."""

    SYSTEM = "system"  # the application's instructions: context, never scored as an attack
    USER = "user"  # read as a prompt
    ASSISTANT = "assistant"  # the model; last in a conversation, the answer being checked
    TOOL = "tool"  # a tool's result: untrusted data (indirect injection)
    DOCUMENT = "document"  # a retrieved or pasted document: untrusted data

    @property
    def is_data(self) -> bool:
        """Whether the message is data the assistant reads, not an instruction it takes."""
        return self in (Role.TOOL, Role.DOCUMENT)


class StreamMode(enum.StrEnum):
    """How a streamed answer is released while it is checked."""

    HOLD_BACK = "hold_back"  # release text only once its window passed the checks
    STREAM_FIRST = "stream_first"  # release at once; a violation stops the stream
    AUDIT = "audit"  # release at once, never interfere, record what was found
