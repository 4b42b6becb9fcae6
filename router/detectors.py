"""Prefilter detectors: checks a regular expression cannot express, named by rules.

A pattern pack rule may give `detector: <name>` instead of `pattern:`; the
prefilter then calls the function registered here under that name. Each
detector takes the normalised text and returns the span it flags, or None.
They must stay linear in the text's length, like the RE2 patterns.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from router.documents import addressed_instructions

__all__ = ["DETECTORS", "Detector", "addressed_instruction", "adversarial_suffix"]

Detector = Callable[[str], tuple[int, int] | None]

# Characters that prose rarely puts inside a word but optimised suffixes do.
_CODE_SYMBOLS = re.compile(r"[{}\[\]<>|\\`$=~^_*#@+%]|\w\(|\)\w")
_GLUED_CAMEL = re.compile(r"[^\W\d_][A-Z]")
_EDGE_PUNCTUATION = "\"'.,!?;:()"
_PLAIN_DASHES = {"-", "–", "—", "&", "/"}

# A line must open with this many plain words (of the first five) to count as prose.
_PROSE_OPENING = 4
# Of the line's last tokens (after its opening), how many must be noisy, and how densely.
_TAIL_TOKENS = 20
_MIN_NOISY = 4
_MIN_DENSITY = 0.25


def _noisy(token: str) -> bool:
    """A token prose would not contain: code symbols inside it, glued CamelCase, or pure symbols."""
    core = token.strip(_EDGE_PUNCTUATION)
    if not core:
        return False
    if not any(ch.isalnum() for ch in core):
        return core not in _PLAIN_DASHES
    if _CODE_SYMBOLS.search(core):
        return True
    return bool(_GLUED_CAMEL.search(core[1:])) and not core.isupper()


def _plain_word(token: str) -> bool:
    return token.strip(_EDGE_PUNCTUATION).isalpha()


def adversarial_suffix(text: str) -> tuple[int, int] | None:
    """Span of the last line when it is a prose request ending in a run of token noise.

    Optimised jailbreak suffixes (GCG and its successors, Zou et al. 2023) are
    strings of tokens chosen by gradient search and appended to a plain
    request: brackets, code symbols and glued word pieces in a row
    ("... college :) rapideathon please?? (['Sure{\\! Here"). A request that
    reads as prose and then degenerates into such a run on the same line is
    what this flags. Code and tables are spared because they rarely open the
    line with plain words, and escaped newlines count as line breaks.
    """
    stripped = text.rstrip()
    escaped = stripped.rfind("\\n")
    start = max(stripped.rfind("\n") + 1, escaped + 2 if escaped >= 0 else 0)
    line = stripped[start:]
    tokens = line.split()
    if len(tokens) < 10 or sum(_plain_word(t) for t in tokens[:5]) < _PROSE_OPENING:
        return None
    tail = tokens[5:][-_TAIL_TOKENS:]
    noisy = sum(_noisy(t) for t in tail)
    if noisy < _MIN_NOISY or noisy / len(tail) < _MIN_DENSITY:
        return None
    return start, len(stripped)


def addressed_instruction(text: str) -> tuple[int, int] | None:
    """Span of the first instruction addressed to the assistant, as data would carry it.

    A user asks; a pasted email, web page or tool output does not give the
    assistant orders. The patterns (`router.documents.addressed_instructions`:
    "to you, the AI model", a planted "<INFORMATION>" or "### system message"
    block, "before you answer, ...") are what indirect injections share, and
    ordinary requests almost never contain them (see the rule's description).
    """
    spans = addressed_instructions(text)
    return spans[0] if spans else None


DETECTORS: dict[str, Detector] = {
    "addressed_instruction": addressed_instruction,
    "adversarial_suffix": adversarial_suffix,
}
