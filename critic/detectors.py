"""Cheap output detectors: secrets, private keys, SQL schema dumps, system-prompt echoes.

They run on every response (microseconds, RE2) and on every revision the
critic proposes, so a hijacked critic cannot launder a violation. A hit names
the constitution rule that claims it (a rule lists `detectors:` kinds or its
own `patterns:`), or `detector.<kind>` when no rule does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import re2

from critic.constitution import Constitution, Rule, Severity, Target

__all__ = ["ECHO_WORDS", "DetectorHit", "detect", "echoed_spans", "redact"]

REDACTED = "[redacted]"


def _options(case_sensitive: bool) -> re2.Options:
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False
    options.dot_nl = True
    return options


# (kind, name, pattern, case sensitive)
_BUILTIN = [
    ("secrets", "openai_key", r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}", True),
    ("secrets", "aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", True),
    ("secrets", "github_token", r"\bgh[pousr]_[A-Za-z0-9]{30,}\b", True),
    ("secrets", "slack_token", r"\bxox[abprs]-[A-Za-z0-9-]{10,}", True),
    ("secrets", "google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}\b", True),
    ("secrets", "stripe_key", r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}", True),
    ("secrets", "jwt", r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}", True),
    (
        "secrets",
        "credential_assignment",
        r"\b[A-Za-z0-9_]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|"
        r"client[_-]?secret)\b\s*[:=]\s*[\"']?[^\s\"'<>]*[0-9_!@#$%^&*+=/\\-][^\s\"'<>]*",
        False,
    ),
    ("secrets", "connection_string", r"\b[a-z][a-z0-9+.\-]*://[^\s:/@]+:[^\s@/]+@[^\s/]+", False),
    (
        "private_keys",
        "private_key_block",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
        True,
    ),
    (
        "sql_schema",
        "sql_ddl",
        r"\b(?:CREATE|ALTER|DROP)\s+(?:TABLE|INDEX|VIEW|SCHEMA|DATABASE|SEQUENCE|TYPE)\b"
        r"[^;]*(?:;|$)",
        False,
    ),
    ("sql_schema", "schema_listing", r"\b(?:information_schema|pg_catalog|sqlite_master)\b", False),
    (
        "system_prompt_echo",
        "prompt_disclosure",
        r"\b(?:my|the)\s+(?:system\s+prompt|hidden\s+instructions|initial\s+instructions|"
        r"system\s+message)\s+(?:is|are|says|reads|was|were)\b",
        False,
    ),
    (
        "system_prompt_echo",
        "instruction_echo",
        r"(?:^|\n)\s*(?:system\s*:\s*)?you\s+are\s+an?\s+[^.\n]{0,80}\b(?:assistant|bot|agent)\b"
        r"[^\n]{0,300}\b(?:never|do\s+not|don't|must\s+not|under\s+no\s+circumstances)\b",
        False,
    ),
]
_COMPILED = [
    (kind, name, re2.compile(pattern, _options(case_sensitive)))
    for kind, name, pattern, case_sensitive in _BUILTIN
]
_FENCE = re2.compile(r"```.*?(?:```|$)", _options(True))


@dataclass(frozen=True, slots=True)
class DetectorHit:
    """A span of text that breaks a machine-checkable rule.

    Attributes:
        detector: `<kind>.<name>` of a built-in detector, or `pattern:<rule id>`.
        rule_id: The constitution rule that claims the hit, or `detector.<kind>`.
        severity: The claiming rule's severity (REVISE when no rule claims it).
        span: Start and end offsets of the text to redact.
    """

    detector: str
    rule_id: str
    severity: Severity
    span: tuple[int, int]


def detect(
    text: str, constitution: Constitution, *, target: Target, system_prompt: str = ""
) -> list[DetectorHit]:
    """Every machine-checkable violation in `text` (built-in detectors and rule patterns).

    With the application's `system_prompt`, a response that reproduces a run of
    it (`ECHO_WORDS` words in a row, or all of a shorter prompt) is a
    `system_prompt_echo.verbatim` hit, whatever the wording around it.
    """
    rules = constitution.rules_for(target)
    hits = []
    for kind, name, pattern in _COMPILED:
        claimer = next((r for r in rules if kind in r.detectors), None)
        for match in pattern.finditer(text):
            hits.append(_hit(f"{kind}.{name}", kind, claimer, _widen(text, match.span(), kind)))
    if system_prompt and target is Target.RESPONSE:
        claimer = next((r for r in rules if "system_prompt_echo" in r.detectors), None)
        for span in echoed_spans(text, system_prompt):
            hits.append(_hit("system_prompt_echo.verbatim", "system_prompt_echo", claimer, span))
    for rule in rules:
        for pattern in rule.compiled:
            for match in pattern.finditer(text):
                hits.append(_hit(f"pattern:{rule.id}", "", rule, _widen(text, match.span(), "")))
    return hits


ECHO_WORDS = 8  # words of the system prompt in a row that make an echo
_WORD = re2.compile(r"\w+", _options(False))


def echoed_spans(text: str, system_prompt: str) -> list[tuple[int, int]]:
    """Spans of `text` that repeat `ECHO_WORDS` or more consecutive words of
    `system_prompt` (case and punctuation aside), merged; all of a shorter prompt counts."""
    source = [m.group(0).lower() for m in _WORD.finditer(system_prompt)]
    if not source:
        return []
    n = min(ECHO_WORDS, len(source))
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    words = [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    spans: list[list[int]] = []
    for i in range(len(words) - n + 1):
        if tuple(w for w, _, _ in words[i : i + n]) in grams:
            start, end = words[i][1], words[i + n - 1][2]
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
    return [(start, end) for start, end in spans]


def _hit(detector: str, kind: str, rule: Rule | None, span: tuple[int, int]) -> DetectorHit:
    if rule is None:
        return DetectorHit(detector, f"detector.{kind}", Severity.REVISE, span)
    return DetectorHit(detector, rule.id, rule.severity, span)


def _widen(text: str, span: tuple[int, int], kind: str) -> tuple[int, int]:
    """A schema dump inside a code fence takes the whole fence with it."""
    if kind != "sql_schema":
        return span
    for fence in _FENCE.finditer(text):
        start, end = fence.span()
        if start <= span[0] < end:
            return start, max(end, span[1])
    return span


def redact(text: str, hits: Sequence[DetectorHit]) -> str:
    """`text` with every hit's span replaced by "[redacted]" (overlaps merged)."""
    spans = sorted(hit.span for hit in hits)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, cursor = [], 0
    for start, end in merged:
        out += [text[cursor:start], REDACTED]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)
