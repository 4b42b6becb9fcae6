"""Threshold recommendations against numbers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embeddings_index.vocabulary import Route
from gateway.offline.calibrate import calibrate, plot_calibration, routes_at
from router.evaluation import LabelledText
from router.prefilter import PrefilterHit, RuleAction


def rows(labels: str) -> list[LabelledText]:
    kinds = {"r": ("risky", "harmful"), "b": ("benign", "benign"), "h": ("benign", "benign_hard")}
    return [LabelledText(str(i), "t", *kinds[c], "s", "f.jsonl") for i, c in enumerate(labels)]


DATA = rows("rrrrrrrrrr" + "bbbbbbbbbb" + "hhhh")
RISKY_SCORES = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1]
BENIGN_SCORES = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.55, 0.96]
HARD_SCORES = [0.3, 0.5, 0.65, 0.7]
SCORES = [*RISKY_SCORES, *BENIGN_SCORES, *HARD_SCORES]
NO_HITS: list[tuple[PrefilterHit, ...]] = [()] * len(DATA)


def hit(action: RuleAction) -> tuple[PrefilterHit, ...]:
    return (PrefilterHit("rule", "prompt_injection", action, 0.5, "normalized", (0, 1)),)


def test_target_recall_picks_the_highest_threshold_that_reaches_it() -> None:
    result = calibrate(DATA, SCORES, NO_HITS, target_recall=0.8, max_block_benign=0.1)
    assert result.thresholds.escalate_at == 0.5  # the 8th-highest risky score
    assert result.overall.recall_risky == 0.8
    assert result.overall.escalation_benign == pytest.approx(0.2)  # 0.55 and 0.96
    [hard] = [r for r in result.by_category if r.group == "benign_hard"]
    assert hard.escalation_benign_hard == 0.75


def test_escalation_budget_picks_the_lowest_threshold_within_it() -> None:
    result = calibrate(DATA, SCORES, NO_HITS, max_escalation=0.1, max_block_benign=0.1)
    assert 0.55 < result.thresholds.escalate_at <= 0.96
    assert result.overall.escalation_benign == pytest.approx(0.1)
    assert result.overall.recall_risky == 0.7  # risky scores above 0.55: 0.6 and up


def test_block_at_blocks_at_most_the_allowed_share_of_benign() -> None:
    result = calibrate(DATA, SCORES, NO_HITS, target_recall=0.5, max_block_benign=1 / 14)
    benign_scores = [s for s, r in zip(SCORES, DATA, strict=True) if r.label == "benign"]
    blocked = sum(s >= result.thresholds.block_at for s in benign_scores)
    assert blocked <= 1 and result.thresholds.block_at >= result.thresholds.escalate_at


def test_tier0_blocks_count_as_caught() -> None:
    hits = [hit(RuleAction.BLOCK), *NO_HITS[1:]]
    result = calibrate(DATA, [1.0, *SCORES[1:]], hits, target_recall=0.1)
    assert result.overall.recall_risky >= 0.1 and result.overall.blocked > 0


def test_rows_an_escalating_rule_caught_are_escalated_not_blocked_and_spend_the_budget() -> None:
    # the benign row scored 0.3 carries an escalating rule's hit (as a planted
    # instruction would): it escalates whatever escalate_at is, so a budget of two
    # benign rows in ten leaves room for one more, 0.96, and not for 0.55
    hits = list(NO_HITS)
    hits[10 + 6] = hit(RuleAction.ESCALATE)
    result = calibrate(DATA, SCORES, hits, max_escalation=0.2, max_block_benign=0.1)
    assert 0.55 < result.thresholds.escalate_at <= 0.96
    assert result.overall.escalation_benign == pytest.approx(0.2)
    routes = routes_at(np.array(SCORES), hits, result.thresholds)
    assert routes[10 + 6] is Route.ESCALATE and routes[10 + 9] is Route.BLOCK  # 0.96 >= block_at


def test_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(DATA, SCORES, NO_HITS)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(DATA, SCORES, NO_HITS, target_recall=0.9, max_escalation=0.1)


def test_plot_is_a_png(tmp_path: Path) -> None:
    result = calibrate(DATA, SCORES, NO_HITS, target_recall=0.8)
    plot_calibration(DATA, SCORES, result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
