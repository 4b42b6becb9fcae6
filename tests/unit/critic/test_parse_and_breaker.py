"""Reading the critic's JSON, and the circuit breaker."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest

from critic.chat import LLMSettings
from critic.constitution import Target, load_constitutions
from critic.llm_critic import CircuitBreaker, LLMCritic, parse_critique
from critic.types import CriticUnavailable, Critique, Deadline

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


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_breaker(clock: FakeClock, **kw: float) -> CircuitBreaker:
    breaker = CircuitBreaker(failures=1, reset_s=10.0, clock=clock, **kw)
    breaker.record(ok=False)
    assert breaker.is_open and not breaker.allow()
    clock.now += 10.0  # the reset interval has passed: half-open
    return breaker


def test_a_trial_ended_without_a_verdict_frees_the_slot_and_keeps_the_circuit_open() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, lease_s=60.0)
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # ... holds the half-open slot
    breaker.release()  # cancelled, or the caller's deadline: nothing learnt of the endpoint
    assert breaker.is_open  # not counted as a success
    assert breaker.allow()  # the next request may try at once
    breaker.record(ok=True)
    assert not breaker.is_open and breaker.allow()


def test_a_lost_trial_loses_its_lease() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, lease_s=5.0)
    assert breaker.allow()  # a trial that will never report
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the lease ran out: another trial goes out
    assert not breaker.allow()  # ... and holds the slot in turn


def test_a_failed_trial_reopens_for_a_fresh_reset_interval() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, lease_s=60.0)
    assert breaker.allow()
    breaker.record(ok=False)
    assert breaker.is_open and not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


# LLMCritic's half-open trial, ended every way a call can end, through an injected client.

CONSTITUTION = load_constitutions()["payflow"]


class ScriptedClient:
    """Stands in for `openai.AsyncOpenAI`: each call runs the next scripted action."""

    def __init__(self) -> None:
        self.actions: deque[Callable[[], Awaitable[object]]] = deque()
        self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, **kwargs: object) -> object:
        self.calls += 1
        return await self.actions.popleft()()

    async def close(self) -> None:
        pass


def completion(content: str) -> object:
    message = SimpleNamespace(content=content)
    return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=None)


async def malformed() -> object:
    return completion("no json here")


async def clean_verdict() -> object:
    return completion(answer(violates_rules=False, violated_rules=[], revised_response=""))


async def hang() -> object:
    await asyncio.Event().wait()  # never answers
    raise AssertionError("unreachable")


async def programming_error() -> object:
    raise RuntimeError("the client broke in an unexpected way")


async def judge(critic: LLMCritic, deadline_s: float = 5.0) -> Critique:
    return await critic.critique(
        target=Target.PROMPT, prompt="hello", draft="", constitution=CONSTITUTION,
        deadline=Deadline(deadline_s),
    )  # fmt: skip


async def cancelled_trial(critic: LLMCritic, client: ScriptedClient) -> None:
    client.actions.append(hang)
    calls = client.calls
    task = asyncio.create_task(judge(critic))
    for _ in range(1000):  # until the trial's call is out
        if client.calls > calls or task.done():
            break
        await asyncio.sleep(0)
    assert client.calls == calls + 1 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def deadline_before_the_call(critic: LLMCritic, client: ScriptedClient) -> None:
    calls = client.calls
    with pytest.raises(CriticUnavailable) as caught:
        await judge(critic, deadline_s=0.0)
    assert caught.value.reason == "deadline" and client.calls == calls  # no call went out


async def unexpected_exception(critic: LLMCritic, client: ScriptedClient) -> None:
    client.actions.append(programming_error)
    with pytest.raises(RuntimeError):
        await judge(critic)


@pytest.mark.parametrize(
    "end_trial", [cancelled_trial, deadline_before_the_call, unexpected_exception]
)
async def test_the_critic_recovers_however_the_half_open_trial_ends(
    end_trial: Callable[[LLMCritic, ScriptedClient], Awaitable[None]],
) -> None:
    client = ScriptedClient()
    settings = LLMSettings(max_retries=0, circuit_failures=1, circuit_reset_s=0.0)
    critic = LLMCritic(settings, client=client)  # type: ignore[arg-type]
    client.actions.extend([malformed, malformed])  # a failed judgement opens the circuit
    with pytest.raises(CriticUnavailable):
        await judge(critic)
    assert critic.circuit_open
    await end_trial(critic, client)  # the half-open trial ends without a success
    client.actions.append(clean_verdict)  # the endpoint is healthy again
    critique = await judge(critic)  # not circuit_open
    assert not critique.violates and not critic.circuit_open
