"""The critique -> revise -> re-check loop with a scripted critic (injected, not patched)."""

from __future__ import annotations

from collections import deque

import pytest

from critic.constitution import Constitution, Target, load_constitutions
from critic.local_critic import LocalCritic
from critic.loop import judge_prompt, review_response
from critic.types import CriticUnavailable, Critique, Deadline
from embeddings_index.vocabulary import CriticKind, Decision, FailMode

PAYFLOW = load_constitutions()["payflow"]
TONE = "payflow.professional-tone"


class ScriptedCritic:
    """Answers with the scripted critiques in order; raises when called beyond them."""

    kind = CriticKind.LLM
    model = "scripted"

    def __init__(self, *answers: Critique | CriticUnavailable) -> None:
        self.answers = deque(answers)
        self.judged: list[str] = []

    async def critique(self, *, target: Target, prompt: str, draft: str,
                       constitution: Constitution, deadline: Deadline) -> Critique:  # fmt: skip
        self.judged.append(draft if target is Target.RESPONSE else prompt)
        answer = self.answers.popleft()  # IndexError when over-called
        if isinstance(answer, CriticUnavailable):
            raise answer
        return answer


def bad(revised: str = "", rules: tuple[str, ...] = (TONE,)) -> Critique:
    return Critique(True, rules, "breaks a rule", revised)


CLEAN = Critique(False, (), "fine")


async def review(critic: object, draft: str = "RTFM.", **kw: object):
    args = {"prompt": "why is my card blocked", "draft": draft, "constitution": PAYFLOW,
            "critic": critic, "deadline": Deadline(5), "max_rounds": 2,
            "fail_mode": FailMode.CLOSED, "needs_judgement": True}  # fmt: skip
    args.update(kw)
    return await review_response(**args)  # type: ignore[arg-type]


async def test_clean_draft_is_allowed_after_one_critique() -> None:
    outcome = await review(ScriptedCritic(CLEAN))
    assert outcome.verdict is Decision.ALLOW and outcome.final_text == "RTFM."
    assert len(outcome.rounds) == 1 and outcome.fail_reason == ""


async def test_revision_that_passes_is_returned() -> None:
    critic = ScriptedCritic(bad("Sorry for the trouble; let's fix it."), CLEAN)
    outcome = await review(critic)
    assert outcome.verdict is Decision.REVISE
    assert outcome.final_text == "Sorry for the trouble; let's fix it."
    assert outcome.violated_rules == (TONE,)
    assert critic.judged == ["RTFM.", "Sorry for the trouble; let's fix it."]


async def test_still_violating_after_the_last_round_blocks() -> None:
    critic = ScriptedCritic(bad("v1"), bad("v2"), bad("v3"))
    outcome = await review(critic, max_rounds=2)
    assert outcome.verdict is Decision.BLOCK and len(critic.judged) == 3
    assert outcome.final_text == PAYFLOW.safe_reply


async def test_block_severity_rule_blocks_at_once() -> None:
    critic = ScriptedCritic(bad("anything", rules=("base.no-serious-harm",)))
    outcome = await review(critic)
    assert outcome.verdict is Decision.BLOCK and len(critic.judged) == 1


async def test_no_revision_offered_blocks() -> None:
    outcome = await review(ScriptedCritic(bad("")))
    assert outcome.verdict is Decision.BLOCK


async def test_revision_is_rechecked_by_detectors_and_prefilter() -> None:
    critic = ScriptedCritic(bad("Use sk-live-ABCDEFGHIJKLMNOPQRSTUVWX"), CLEAN, CLEAN)
    outcome = await review(critic, recheck=lambda text: ["prefilter.x"] if "pwned" in text else [])
    assert outcome.verdict is not Decision.REVISE or "sk-live" not in outcome.final_text
    assert "payflow.no-internal-disclosure" in outcome.violated_rules
    critic = ScriptedCritic(bad("you have been pwned"), CLEAN)
    outcome = await review(critic, max_rounds=1,
                           recheck=lambda text: ["prefilter.x"] if "pwned" in text else [])  # fmt: skip
    assert outcome.verdict is Decision.BLOCK and "prefilter.x" in outcome.violated_rules


@pytest.mark.parametrize(("mode", "expected"), [(FailMode.CLOSED, Decision.BLOCK),
                                                (FailMode.OPEN, Decision.ALLOW)])  # fmt: skip
async def test_unavailable_critic_resolves_to_the_fail_mode(
    mode: FailMode, expected: Decision
) -> None:
    critic = ScriptedCritic(CriticUnavailable("timeout", "slow"))
    outcome = await review(critic, fail_mode=mode)
    assert outcome.verdict is expected and outcome.fail_reason == "timeout"


async def test_local_critic_redacts_and_needs_the_fail_mode_only_for_risky_prompts() -> None:
    draft = "Here: CREATE TABLE t (id int); anything else I can do for your account today?"
    routine = await review(LocalCritic(), draft=draft, needs_judgement=False)
    assert routine.verdict is Decision.REVISE and "CREATE TABLE" not in routine.final_text
    assert routine.critic is CriticKind.LOCAL and routine.fail_reason == ""
    risky = await review(LocalCritic(), draft=draft, needs_judgement=True)
    assert risky.verdict is Decision.BLOCK and risky.fail_reason == "not_judged"


async def test_local_critic_answers_with_the_safe_reply_when_little_is_left() -> None:
    outcome = await review(LocalCritic(), draft="CREATE TABLE t (id int, amount int, owner text);",
                           needs_judgement=False)  # fmt: skip
    assert outcome.final_text == PAYFLOW.safe_reply_for(["payflow.no-internal-disclosure"])


async def test_judge_prompt() -> None:
    blocked = await judge_prompt(prompt="x", constitution=PAYFLOW, deadline=Deadline(5),
                                 critic=ScriptedCritic(bad()), fail_mode=FailMode.OPEN)  # fmt: skip
    assert blocked.verdict is Decision.BLOCK
    allowed = await judge_prompt(prompt="x", constitution=PAYFLOW, deadline=Deadline(5),
                                 critic=ScriptedCritic(CLEAN), fail_mode=FailMode.CLOSED)  # fmt: skip
    assert allowed.verdict is Decision.ALLOW
    local = await judge_prompt(prompt="x", constitution=PAYFLOW, deadline=Deadline(5),
                               critic=LocalCritic(), fail_mode=FailMode.OPEN)  # fmt: skip
    assert local.verdict is Decision.ALLOW and local.fail_reason == "not_judged"
