"""The local critic: the embedded default when no LLM endpoint is configured.

It enforces the machine-checkable part of a constitution (rule patterns and
built-in detectors): it redacts offending spans and, where little of use is
left, answers with the rule's safe reply. It cannot judge the rest (tone,
advice, intent): where that judgement is needed, the loop answers it with the
policy's fail mode.
"""

from __future__ import annotations

from critic.constitution import Constitution, Target
from critic.detectors import REDACTED, detect, redact
from critic.types import Critique, Deadline
from embeddings_index.vocabulary import CriticKind

__all__ = ["LocalCritic"]

# Below this share of the original characters, a redaction is not worth sending.
_MIN_USEFUL_SHARE = 0.5


class LocalCritic:
    """A deterministic `Critic` over detectors and rule patterns."""

    @property
    def kind(self) -> CriticKind:
        return CriticKind.LOCAL

    @property
    def model(self) -> str:
        return ""

    async def critique(
        self,
        *,
        target: Target,
        prompt: str,
        draft: str,
        constitution: Constitution,
        deadline: Deadline,
    ) -> Critique:
        text = draft if target is Target.RESPONSE else prompt
        hits = detect(text, constitution, target=target)
        if not hits:
            return Critique(False, (), "no machine-checkable rule is broken")
        violated = tuple(dict.fromkeys(hit.rule_id for hit in hits))
        detectors = ", ".join(sorted({hit.detector for hit in hits}))
        revised = ""
        if target is Target.RESPONSE:
            revised = redact(text, hits)
            useful = len(revised.replace(REDACTED, "").strip())
            if useful < _MIN_USEFUL_SHARE * len(text.strip()):
                revised = constitution.safe_reply_for(violated)
        return Critique(True, violated, f"local critic matched {detectors}", revised)
