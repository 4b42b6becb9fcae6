"""Leave-one-source-out evaluation: no file ever scores itself, thresholds come from the others."""

from __future__ import annotations

import numpy as np

from router.cross_source import (
    Corpus,
    cross_source,
    format_cross_source,
    group_sources,
    leave_one_source_out,
    vigil_method,
)
from router.evaluation import LabelledText

FILES = ("a.jsonl", "b.jsonl", "c.jsonl")


def corpus(seed: int = 0, per_file: int = 40) -> Corpus:
    """Three files of risky and benign rows whose features separate them (plus noise)."""
    rng = np.random.default_rng(seed)
    rows, risky, vectors = [], [], []
    for f in FILES:
        for i in range(per_file):
            is_risky = i % 2 == 0
            category = "harmful" if is_risky else ("benign_hard" if i % 4 == 1 else "benign")
            label = "risky" if is_risky else "benign"
            rows.append(LabelledText(f"{f}-{i}", f"text {i}", label, category, "test", f))
            risky.append(is_risky)
            center = np.array([1.0, 0.0]) if is_risky else np.array([0.0, 1.0])
            v = center + rng.normal(0, 0.2, 2)
            vectors.append(v / np.linalg.norm(v))
    x = np.array(vectors) * 3
    pack_x = np.array([[3.0, 0.0], [0.0, 3.0]])
    return Corpus(
        rows=rows,
        files=np.array([r.file for r in rows]),
        risky=np.array(risky),
        hard=np.array([r.category == "benign_hard" for r in rows]),
        blocked=np.zeros(len(rows), dtype=bool),
        vectors=np.array(vectors, dtype=np.float32),
        x=x,
        pack_x=pack_x,
        pack_risky=np.array([True, False]),
        pack_groups=["starter:harmful", "starter:benign"],
    )


def test_no_file_is_scored_or_calibrated_by_a_model_that_saw_it() -> None:
    data = corpus()
    fitted_on: list[frozenset[str]] = []

    def method(train: frozenset[str]):
        fitted_on.append(train)
        return lambda idx: np.full(len(idx), float(len(train)))

    folded = leave_one_source_out(data, method)
    # Each held-out file is scored by the model without it (two files left) ...
    assert np.all(folded.scores == 2.0)
    # ... and calibrated on the others, each scored without itself and the held-out one.
    assert all(np.all(c == 1.0) for c in folded.calibration.values())
    assert set(fitted_on) == {frozenset(FILES) - {f} for f in FILES} | {
        frozenset({f}) for f in FILES
    }


def test_vigil_flags_only_what_is_near_a_risky_text_of_the_other_files() -> None:
    data = corpus()
    score = vigil_method(data)(frozenset({"a.jsonl"}))
    rows_b = np.flatnonzero(data.files == "b.jsonl")
    sims = score(rows_b)
    assert sims[data.risky[rows_b]].min() > 0.8 > sims[~data.risky[rows_b]].max()
    assert np.all(vigil_method(data)(frozenset())(rows_b) == 0.0)  # an empty bank flags nothing


def test_the_report_has_the_router_the_policy_row_and_the_baseline() -> None:
    result = cross_source(corpus(), target=0.1, policy_escalate_at=0.5)
    names = [r.name for r in result.results]
    assert names == [
        "router @ 10% benign",
        "router @ policy escalate_at 0.5",
        "vigil @ distance <= 0.4",
        "vigil @ 10% benign",
    ]
    router = result.results[0]
    assert [r.group for r in router.files] == list(FILES)
    assert router.overall.recall_risky == 1.0 and router.overall.escalation_benign <= 0.1
    assert router.overall.auroc is not None and router.overall.auroc > 0.99
    text = format_cross_source(result)
    assert "summary (pooled over held-out files)" in text and "c.jsonl" in text
    assert result.as_dict()["target_benign_escalation"] == 0.1


def test_a_held_out_group_is_never_scored_or_calibrated_by_a_model_that_saw_any_of_it() -> None:
    data = corpus()
    groups = {"a.jsonl": "g1", "b.jsonl": "g1", "c.jsonl": "g2"}
    fitted_on: list[frozenset[str]] = []

    def method(train: frozenset[str]):
        fitted_on.append(train)
        return lambda idx: np.full(len(idx), float(len(train)))

    folded = leave_one_source_out(data, method, groups)
    held_g1 = np.isin(data.files, ["a.jsonl", "b.jsonl"])
    assert np.all(folded.scores[held_g1] == 1.0)  # scored by the model of c alone
    assert np.all(folded.scores[~held_g1] == 2.0)  # c scored by the model of a and b
    assert set(folded.calibration) == {"g1", "g2"}
    assert all(np.all(c == 0.0) for c in folded.calibration.values())  # nested: nothing left
    assert set(fitted_on) == {
        frozenset({"c.jsonl"}),
        frozenset({"a.jsonl", "b.jsonl"}),
        frozenset(),
    }


def test_groups_deal_sources_with_risky_rows_first_and_report_the_worst() -> None:
    data = corpus()
    assert group_sources(data, 2) == {
        "a.jsonl": "group 1",
        "b.jsonl": "group 2",
        "c.jsonl": "group 1",
    }
    result = cross_source(data, groups=2)
    router = result.results[0]
    assert [r.group for r in router.units] == ["group 1", "group 2"]
    assert router.worst_recall is not None and router.worst_recall.group in ("group 1", "group 2")
    assert router.worst_benign is not None and router.worst_benign.group in FILES
    text = format_cross_source(result)
    assert "held out: 2 groups of sources" in text and "worst_rec" in text
