"""Reading the critic's JSON, and the circuit breaker."""

from __future__ import annotations

import json

import pytest

from critic.constitution import Target, load_constitutions
from critic.llm_critic import CircuitBreaker, parse_critique

RULES = load_constitutions()["payflow"].rules_for(Target.RESPONSE)


def answer(**fields: object) -> str:
    base = {"violates_rules": True, "violated_rules": ["payflow.professional-tone"],
            "explanation": "rude", "revised_response": "Sorry about that."}  # fmt: skip
    return json.dumps({**base, **fields})


def test_parses_the_fixed_shape() -> None:
    critique = parse_critique(answer(), RULES)
    assert critique.violates and critique.violated_rules == ("payflow.professional-tone",)
    assert critique.revised_response == "Sorry about that." and critique.notes == ()


def test_tolerates_fences_and_chatter() -> None:
    critique = parse_critique(
        "Sure, here it is:\n```json\n" + answer() + "\n```\nHope that helps", RULES
    )
    assert critique.violates


def test_unknown_rule_ids_are_dropped_and_noted() -> None:
    critique = parse_critique(answer(violated_rules=["payflow.professional-tone", "nope"]), RULES)
    assert critique.violated_rules == ("payflow.professional-tone",)
    assert critique.notes == ("dropped unknown rule id 'nope'",)


def test_named_rules_with_violates_false_is_read_as_a_violation() -> None:
    critique = parse_critique(answer(violates_rules=False), RULES)
    assert critique.violates and critique.notes


@pytest.mark.parametrize(
    "content",
    ["no json here", '{"violates_rules": "yes"}', answer(violated_rules="tone"),
     answer(explanation=3), "{broken"],
)  # fmt: skip
def test_malformed_answers_raise(content: str) -> None:
    with pytest.raises(ValueError):
        parse_critique(content, RULES)


def test_breaker_opens_after_consecutive_failures_and_half_opens() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=0.0)
    breaker.record(ok=False)
    assert not breaker.is_open
    breaker.record(ok=False)
    assert breaker.is_open
    assert breaker.allow()  # reset_s elapsed: one trial goes through
    assert not breaker.allow()  # ... and only one
    breaker.record(ok=True)
    assert not breaker.is_open and breaker.allow()
