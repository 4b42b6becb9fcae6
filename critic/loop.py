"""The Critic-Reviser loop of Constitutional AI, bounded and deadline-aware.

For a response: critique the draft; if it breaks a rule, take the critic's
revision, re-check it with the cheap tiers (detectors, prefilters: a hijacked
critic cannot launder a violation) and critique it again, for at most
`max_rounds` revisions. The outcome is ALLOW (the draft passes), REVISE (the
last revision passes; `final_text` carries it) or BLOCK (a block-severity
rule, no compliant revision, or still violating after the last round).

For a prompt: one critique; a violation BLOCKs, a clean prompt is ALLOWed.

When the critic cannot judge (errors, timeouts, an open circuit, garbage, or
the local critic facing a semantic question), the policy's fail mode decides:
closed -> BLOCK, open -> ALLOW; either way the outcome says `fail_reason`,
so nobody can count a fail-open as a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from critic.constitution import Constitution, Severity, Target
from critic.detectors import DetectorHit, detect, redact
from critic.types import Critic, CriticUnavailable, Critique, Deadline, Usage
from embeddings_index.vocabulary import CriticKind, Decision, FailMode

__all__ = ["Outcome", "Round", "judge_prompt", "review_response"]

# Extra cheap checks on a text: returns ids of the rules it breaks (e.g. prefilter rules).
Recheck = Callable[[str], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Round:
    """One critique: the text judged and what the critic said of it."""

    judged: str
    critique: Critique
    recheck_hits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What the critic tier decided, and everything needed to explain and record it.

    Attributes:
        verdict: ALLOW, REVISE or BLOCK.
        final_text: The text that may go out ("" for a prompt or a BLOCK with no safe reply).
        violated_rules: Rule ids broken by the judged text(s), first round first.
        critique: The last critique's explanation (or why none could be had).
        critic: Which critic answered.
        model: The model that answered ("" for the local critic).
        rounds: Every critique, in order.
        fail_reason: Set when the fail mode decided: why the critic could not judge.
        notes: Corrections the gateway made to the critic's answers.
        critic_ms: Time spent in the critic tier.
    """

    verdict: Decision
    final_text: str
    violated_rules: tuple[str, ...]
    critique: str
    critic: CriticKind
    model: str
    rounds: tuple[Round, ...] = ()
    fail_reason: str = ""
    notes: tuple[str, ...] = ()
    critic_ms: float = 0.0

    @property
    def usage(self) -> Usage:
        """Calls, tokens and cost of every round."""
        total = Usage()
        for r in self.rounds:
            total += r.critique.usage
        return total


@dataclass
class _Run:
    """Book-keeping of one loop."""

    critic: Critic
    constitution: Constitution
    started: float = field(default_factory=time.perf_counter)
    rounds: list[Round] = field(default_factory=list)
    violated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, judged: str, critique: Critique, recheck_hits: Sequence[str] = ()) -> None:
        self.rounds.append(Round(judged, critique, tuple(recheck_hits)))
        self.notes += critique.notes
        for rule_id in (*critique.violated_rules, *recheck_hits):
            if rule_id not in self.violated:
                self.violated.append(rule_id)

    def outcome(
        self, verdict: Decision, final_text: str, critique: str, fail_reason: str = ""
    ) -> Outcome:
        return Outcome(
            verdict=verdict,
            final_text=final_text,
            violated_rules=tuple(self.violated),
            critique=critique,
            critic=self.critic.kind,
            model=self.critic.model,
            rounds=tuple(self.rounds),
            fail_reason=fail_reason,
            notes=tuple(self.notes),
            critic_ms=(time.perf_counter() - self.started) * 1000.0,
        )

    def blocking(self) -> list[str]:
        return [
            rule_id
            for rule_id in self.violated
            if (rule := self.constitution.rule(rule_id)) is not None
            and rule.severity is Severity.BLOCK
        ]


async def review_response(
    *,
    prompt: str,
    draft: str,
    constitution: Constitution,
    critic: Critic,
    deadline: Deadline,
    max_rounds: int,
    fail_mode: FailMode,
    needs_judgement: bool,
    recheck: Recheck = lambda text: (),
    system_prompt: str = "",
) -> Outcome:
    """Critique, revise and re-check a draft answer.

    Args:
        needs_judgement: The prompt's risk asks for a semantic judgement (not
            only the machine-checkable rules); the local critic cannot give
            one, so it ends in the fail mode.
        recheck: Extra cheap checks (the gateway's prefilter) run on every revision;
            the built-in detectors run on every text, the draft included.
        system_prompt: The application's system prompt, when the caller sent it:
            a text that repeats it is a violation (see `detect`).
    """
    run = _Run(critic, constitution)
    text = draft
    for round_number in range(max_rounds + 1):
        try:
            critique = await critic.critique(
                target=Target.RESPONSE, prompt=prompt, draft=text,
                constitution=constitution, deadline=deadline,
            )  # fmt: skip
        except CriticUnavailable as exc:
            # A revision the critic cannot re-check still meets the cheap checks; the
            # draft it replaces was judged violating, so it never goes back out.
            broken = [r for r in recheck(text) if r not in run.violated] if round_number else []
            if broken:
                run.violated.extend(broken)
                return _block(run, constitution, "the revision breaks a prefilter rule")
            return _fail(
                run, fail_mode, exc.reason, exc.message, text, constitution, draft=draft,
                system_prompt=system_prompt,
            )  # fmt: skip
        hits = detect(text, constitution, target=Target.RESPONSE, system_prompt=system_prompt)
        rechecked = recheck(text) if round_number else ()  # revisions only: critic-made text
        cheap = list(dict.fromkeys([*(h.rule_id for h in hits), *rechecked]))
        run.add(text, critique, cheap)
        if not critique.violates and not cheap:
            if critic.kind is CriticKind.LOCAL and needs_judgement:
                reason = "the local critic checks only machine-checkable rules"
                return _fail(
                    run, fail_mode, "not_judged", reason, text, constitution, draft=draft,
                    system_prompt=system_prompt,
                )  # fmt: skip
            verdict = Decision.ALLOW if round_number == 0 else Decision.REVISE
            return run.outcome(verdict, text, critique.explanation)
        revision = critique.revised_response or (redact(text, hits) if hits else "")
        if run.blocking():
            return _block(run, constitution, critique.explanation)
        if round_number == max_rounds or not revision:
            return _block(run, constitution, critique.explanation or "no compliant revision")
        text = revision
    raise AssertionError("unreachable")  # pragma: no cover


async def judge_prompt(
    *,
    prompt: str,
    constitution: Constitution,
    critic: Critic,
    deadline: Deadline,
    fail_mode: FailMode,
) -> Outcome:
    """One critique of a user's prompt: BLOCK on a violation, ALLOW when clean."""
    run = _Run(critic, constitution)
    try:
        critique = await critic.critique(
            target=Target.PROMPT, prompt=prompt, draft="", constitution=constitution,
            deadline=deadline,
        )  # fmt: skip
    except CriticUnavailable as exc:
        return _fail(run, fail_mode, exc.reason, exc.message, "", constitution)
    run.add(prompt, critique)
    if critique.violates:
        return run.outcome(Decision.BLOCK, "", critique.explanation)
    if critic.kind is CriticKind.LOCAL:
        reason = "the local critic cannot judge a prompt's intent"
        return _fail(run, fail_mode, "not_judged", reason, "", constitution)
    return run.outcome(Decision.ALLOW, "", critique.explanation)


def _block(run: _Run, constitution: Constitution, critique: str) -> Outcome:
    return run.outcome(Decision.BLOCK, constitution.safe_reply_for(run.violated), critique)


def _fail(
    run: _Run,
    fail_mode: FailMode,
    reason: str,
    message: str,
    text: str,
    constitution: Constitution,
    *,
    draft: str = "",
    system_prompt: str = "",
) -> Outcome:
    """The fail mode's answer; fail-open still enforces the machine-checkable rules.

    `text` is what would go out (the draft or the critic's latest revision);
    fail-open answers ALLOW only when that is the caller's `draft` unchanged,
    and REVISE whenever the text differs from it, so a client that trusts ALLOW
    to mean "send your draft" never sends a draft the critic or a detector
    changed.
    """
    if fail_mode is FailMode.CLOSED:
        final = constitution.safe_reply_for(run.violated) if text else ""
        return run.outcome(Decision.BLOCK, final, message, fail_reason=reason)
    hits: list[DetectorHit] = (
        detect(text, constitution, target=Target.RESPONSE, system_prompt=system_prompt)
        if text
        else []
    )
    if hits:
        for rule_id in dict.fromkeys(h.rule_id for h in hits):
            if rule_id not in run.violated:
                run.violated.append(rule_id)
        return run.outcome(Decision.REVISE, redact(text, hits), message, fail_reason=reason)
    unchanged = text == draft or not draft
    decision = Decision.ALLOW if unchanged else Decision.REVISE
    return run.outcome(decision, text, message, fail_reason=reason)
