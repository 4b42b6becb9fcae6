"""Tier 0 regex prefilters: linear-time pattern packs over the normalised text.

Patterns are data (`router/patterns/*.yaml`), compiled once with RE2, which
guarantees time linear in the input: no pattern can be made to backtrack
catastrophically by a hostile prompt. One RE2 set scans each view of the text
for all patterns at once; only the rules that hit are looked at again.

A rule may instead name a detector (`router.detectors`) for a check a regex
cannot express; it reads the normalised view only.

A rule either BLOCKs on its own (kept for matches that are certain), ESCALATEs
(sends the text to the critic at least, whatever the score: for marks that
benign traffic almost never carries but whose meaning the critic must judge),
or adds a risk signal with a weight in [0, 1] that the scorer combines with
tier 1. An escalating rule's weight also counts as a signal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import re2
import yaml

from router.detectors import DETECTORS
from router.normalize import NormalizedText

__all__ = [
    "DEFAULT_PATTERN_DIR",
    "PatternPackError",
    "Prefilter",
    "PrefilterHit",
    "Rule",
    "RuleAction",
    "load_rules",
]

DEFAULT_PATTERN_DIR = Path(__file__).resolve().parent / "patterns"
_RULE_KEYS = {"id", "category", "action", "weight", "pattern", "detector", "description"}


class RuleAction(enum.Enum):
    """What a rule does when it matches."""

    BLOCK = "block"
    ESCALATE = "escalate"
    SIGNAL = "signal"


@dataclass(frozen=True, slots=True)
class Rule:
    """One prefilter rule from a pack: an RE2 `pattern`, or a named `detector`.

    Detectors (see `router.detectors`) cover what a regular expression cannot,
    such as the density of token noise at the end of a line.
    """

    id: str
    category: str
    action: RuleAction
    weight: float
    pattern: str = ""
    description: str = ""
    detector: str = ""


@dataclass(frozen=True, slots=True)
class PrefilterHit:
    """A rule that matched, where, and how much it weighs."""

    rule_id: str
    category: str
    action: RuleAction
    weight: float
    view: str
    span: tuple[int, int]


class PatternPackError(ValueError):
    """A pattern pack file is malformed; the message names the file, rule and field."""


def load_rules(directory: Path = DEFAULT_PATTERN_DIR) -> list[Rule]:
    """Load and validate every `*.yaml` pack in `directory`."""
    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        for rule in _load_pack(path):
            if rule.id in seen:
                raise PatternPackError(
                    f"{path}: rule id {rule.id!r} already defined in {seen[rule.id]}"
                )
            seen[rule.id] = path
            rules.append(rule)
    return rules


def _load_pack(path: Path) -> list[Rule]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PatternPackError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise PatternPackError(f"{path}: expected a mapping with a 'rules' list")
    return [_parse_rule(path, index, raw) for index, raw in enumerate(doc["rules"])]


def _parse_rule(path: Path, index: int, raw: object) -> Rule:
    where = f"{path}: rules[{index}]"
    if not isinstance(raw, dict):
        raise PatternPackError(f"{where}: expected a mapping")
    where = f"{path}: rule {raw.get('id', f'#{index}')!r}"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PatternPackError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in ("id", "category", "action"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise PatternPackError(f"{where}: field {key!r} is required and must be a string")
    if ("pattern" in raw) == ("detector" in raw):
        raise PatternPackError(f"{where}: give exactly one of 'pattern' and 'detector'")
    if "detector" in raw and (
        not isinstance(raw["detector"], str) or raw["detector"] not in DETECTORS
    ):
        raise PatternPackError(
            f"{where}: field 'detector' must be one of {sorted(DETECTORS)}, not {raw['detector']!r}"
        )
    if "pattern" in raw and (not isinstance(raw["pattern"], str) or not raw["pattern"]):
        raise PatternPackError(f"{where}: field 'pattern' must be a non-empty string")
    try:
        action = RuleAction(raw["action"])
    except ValueError:
        raise PatternPackError(f"{where}: field 'action' must be 'block' or 'signal'") from None
    weight = raw.get("weight", 1.0 if action is RuleAction.BLOCK else 0.5)
    if not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
        raise PatternPackError(f"{where}: field 'weight' must be a number in [0, 1]")
    if "pattern" in raw:
        try:
            re2.compile(raw["pattern"], _OPTIONS)
        except re2.error as exc:
            raise PatternPackError(f"{where}: field 'pattern' is not valid RE2: {exc}") from exc
    return Rule(
        id=raw["id"],
        category=raw["category"],
        action=action,
        weight=float(weight),
        pattern=raw.get("pattern", ""),
        description=str(raw.get("description", "")),
        detector=raw.get("detector", ""),
    )


_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
_OPTIONS.log_errors = False


class Prefilter:
    """All rules compiled into one RE2 set; `scan` reports every rule that hits."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._pattern_rules = [rule for rule in self.rules if not rule.detector]
        self._detector_rules = [rule for rule in self.rules if rule.detector]
        self._compiled = [re2.compile(rule.pattern, _OPTIONS) for rule in self._pattern_rules]
        self._set = re2.Set.SearchSet(_OPTIONS)
        for rule in self._pattern_rules:
            self._set.Add(rule.pattern)
        if self._pattern_rules:
            self._set.Compile()

    @classmethod
    def from_directory(cls, directory: Path = DEFAULT_PATTERN_DIR) -> Prefilter:
        """Build a prefilter from the packs in `directory`."""
        return cls(load_rules(directory))

    def scan(self, normalized: NormalizedText) -> list[PrefilterHit]:
        """Every rule that matches any view of the text, once per rule (first view wins).

        Detectors read the normalised view only: the leetspeak and ROT13 views
        rewrite exactly the symbols and letters they look at.
        """
        hits: dict[str, PrefilterHit] = {}
        for rule in self._detector_rules:
            span = DETECTORS[rule.detector](normalized.text)
            if span is not None:
                hits[rule.id] = PrefilterHit(
                    rule.id, rule.category, rule.action, rule.weight, "normalized", span
                )
        views = normalized.views() if self._pattern_rules else []
        for view, text in views:
            for index in self._set.Match(text) or ():
                rule = self._pattern_rules[index]
                if rule.id in hits:
                    continue
                match = self._compiled[index].search(text)
                span = match.span() if match else (0, 0)
                hits[rule.id] = PrefilterHit(
                    rule.id, rule.category, rule.action, rule.weight, view, span
                )
        return sorted(hits.values(), key=lambda hit: (-hit.weight, hit.rule_id))
