"""Session risk: what a conversation has said so far, kept in memory for a while.

An attack split over several turns passes a check of each turn alone: every
piece looks mild. A session remembers its caller's recent user turns (read
together, they show the whole request) and its risk, decayed per turn, so a
session that was risky a turn ago does not look clean because the last turn
is short.

Sessions are keyed by the caller (its credential, or its address) and the
caller's `session_id`, so one tenant cannot read or poison another's. They
live in memory only: a restart forgets them, a session unused for `ttl_s` is
dropped, and beyond `max_sessions` the least recently used goes. The texts of
recent turns are held for that long in memory and never written anywhere.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Session", "SessionStore"]


@dataclass
class Session:
    """One conversation's state.

    Attributes:
        recent_turns: The last user turns, oldest first.
        risk: The session's risk after its last turn.
        turns: Turns seen.
        last_seen: Monotonic time of the last turn.
    """

    recent_turns: list[str] = field(default_factory=list)
    risk: float = 0.0
    turns: int = 0
    last_seen: float = 0.0


class SessionStore:
    """Sessions by (caller, session id), bounded in number and in age.

    Used from the event loop only (no lock): `turn` reads and updates in one step.
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        ttl_s: float,
        turns_kept: int,
        decay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._max = max_sessions
        self._ttl = ttl_s
        self._turns_kept = turns_kept
        self._decay = decay
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def recent_turns(self, owner: str, session_id: str, new_turns: Sequence[str]) -> list[str]:
        """The session's recent user turns with `new_turns` appended (not stored yet)."""
        session = self._live(owner, session_id)
        earlier = session.recent_turns if session is not None else []
        return [*earlier, *new_turns][-self._turns_kept :]

    def carried_risk(self, owner: str, session_id: str) -> float:
        """What the session's earlier turns pass on to the next: its risk times `decay`."""
        session = self._live(owner, session_id)
        return session.risk * self._decay if session is not None else 0.0

    def record(
        self, owner: str, session_id: str, new_turns: Sequence[str], turn_risk: float
    ) -> Session:
        """Add a turn: its user texts and its risk; returns the session as it now stands.

        The session's risk is the highest of this turn's risk and its earlier
        risk times `decay` (`carried_risk`).
        """
        now = self._clock()
        key = (owner, session_id)
        session = self._live(owner, session_id) or Session()
        session.recent_turns = [*session.recent_turns, *new_turns][-self._turns_kept :]
        session.risk = max(turn_risk, session.risk * self._decay)
        session.turns += 1
        session.last_seen = now
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        self._evict(now)
        return session

    def _live(self, owner: str, session_id: str) -> Session | None:
        session = self._sessions.get((owner, session_id))
        if session is None or self._clock() - session.last_seen > self._ttl:
            return None
        return session

    def _evict(self, now: float) -> None:
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) <= self._max and now - oldest.last_seen <= self._ttl:
                break
            del self._sessions[key]
