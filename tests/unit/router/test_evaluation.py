"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embeddings_index.vocabulary import Route
from router.evaluation import LabelledText, auroc, read_labelled, report_groups


def test_auroc_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auroc([0.1, 0.2], [True, True]) is None


def row(label: str, category: str) -> LabelledText:
    return LabelledText("id", "text", label, category, "src", "f.jsonl")


def test_report_counts_escalated_or_blocked_as_caught() -> None:
    rows = (
        [row("risky", "harmful")] * 4
        + [row("benign", "benign")] * 4
        + [row("benign", "benign_hard")] * 2
    )
    routes = [Route.BLOCK, Route.ESCALATE, Route.ALLOW, Route.ESCALATE,
              Route.ALLOW, Route.ALLOW, Route.ALLOW, Route.ESCALATE,
              Route.BLOCK, Route.ALLOW]  # fmt: skip
    scores = [0.9, 0.6, 0.1, 0.7, 0.1, 0.2, 0.3, 0.6, 0.95, 0.2]
    [report] = report_groups(rows, routes, scores, [("all", range(10))])
    assert report.count == 10
    assert report.recall_risky == 0.75
    assert report.escalation_benign == 0.25
    assert report.escalation_benign_hard == 0.5
    assert report.allowed == 0.5 and report.escalated == 0.3 and report.blocked == 0.2
    assert report.auroc == pytest.approx(auroc(scores, [True] * 4 + [False] * 6))


def test_read_labelled_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps({"id": "1", "text": "hi", "label": "benign", "category": "benign"})
    path.write_text(good + "\n" + json.dumps({"text": "x", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        read_labelled(path)
    path.write_text(good + "\n")
    assert read_labelled(path)[0].file == "d.jsonl"
