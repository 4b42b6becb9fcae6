"""The session store: decayed risk, recent turns, owners apart, bounded by age and number."""

from __future__ import annotations

import pytest

from gateway.runtime.conversation import combined_turns
from gateway.runtime.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, **changes: float) -> SessionStore:
    values = {"max_sessions": 3, "ttl_s": 60.0, "turns_kept": 2, "decay": 0.5, **changes}
    return SessionStore(clock=clock, **values)  # type: ignore[arg-type]


def test_risk_decays_per_turn_and_a_riskier_turn_raises_it() -> None:
    sessions = store(Clock())
    assert sessions.record("a", "s", ["bad"], 0.8).risk == 0.8
    assert sessions.record("a", "s", ["fine"], 0.1).risk == pytest.approx(0.4)
    assert sessions.record("a", "s", ["worse"], 0.9).risk == 0.9
    assert sessions.record("a", "s", ["fine"], 0.0).turns == 4


def test_recent_turns_are_the_last_kept_ones_and_owners_never_mix() -> None:
    sessions = store(Clock())
    sessions.record("a", "s", ["one", "two"], 0.0)
    sessions.record("a", "s", ["three"], 0.0)
    assert sessions.recent_turns("a", "s", ["four"]) == ["three", "four"]
    assert sessions.recent_turns("b", "s", ["four"]) == ["four"]


def test_an_idle_session_is_forgotten_after_its_ttl() -> None:
    clock = Clock()
    sessions = store(clock)
    sessions.record("a", "s", ["bad"], 0.9)
    clock.now = 61.0
    assert sessions.recent_turns("a", "s", []) == []
    assert sessions.record("a", "s", ["fine"], 0.1).risk == 0.1


def test_the_least_recently_used_session_goes_beyond_the_bound() -> None:
    clock = Clock()
    sessions = store(clock)
    for name in ("s1", "s2", "s3"):
        clock.now += 1
        sessions.record("a", name, [name], 0.5)
    sessions.record("a", "s1", ["again"], 0.5)  # s1 is now the most recent
    sessions.record("a", "s4", ["new"], 0.5)
    assert len(sessions) == 3
    assert sessions.recent_turns("a", "s2", []) == []  # the least recently used went
    assert sessions.recent_turns("a", "s1", []) == ["s1", "again"]


def test_recent_turns_are_read_together_two_three_and_four_at_a_time() -> None:
    turns = ["hello", "first half of a request", "second half of it", "and the end"]
    combined = combined_turns(turns, 7, max_chars=30)
    assert [c.driver.combined_turns for c in combined] == [2, 3, 4]
    assert combined[0].text == "second half of it\nand the end"  # no earlier turn dilutes it
    assert all(len(c.text) <= 30 and c.driver.index == 7 for c in combined)
    assert combined_turns(["only one"], 0, max_chars=30) == []
