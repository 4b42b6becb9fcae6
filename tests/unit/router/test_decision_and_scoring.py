"""Routing maths with hand-built evidence: thresholds, features, the logistic model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embeddings_index.faiss_index import Neighbors
from embeddings_index.vocabulary import Route, Tier
from router.decision import Thresholds, lowest_threshold_at_rate, route_for
from router.prefilter import PrefilterHit, RuleAction
from router.scoring import FEATURE_NAMES, Evidence, ScoringModel, features, prefilter_signal

SIGNAL = PrefilterHit("r.sig", "c", RuleAction.SIGNAL, 0.5, "normalized", (0, 1))
BLOCK = PrefilterHit("r.blk", "c", RuleAction.BLOCK, 1.0, "normalized", (0, 1))
ESCALATE = PrefilterHit("r.esc", "c", RuleAction.ESCALATE, 0.5, "normalized", (0, 1))


@pytest.mark.parametrize(
    ("score", "hits", "expected"),
    [
        (0.10, (), (Route.ALLOW, Tier.EMBEDDING)),
        (0.50, (), (Route.ESCALATE, Tier.EMBEDDING)),
        (0.89, (SIGNAL,), (Route.ESCALATE, Tier.EMBEDDING)),
        (0.90, (), (Route.BLOCK, Tier.EMBEDDING)),
        (0.01, (BLOCK,), (Route.BLOCK, Tier.PREFILTER)),
        # an escalating rule raises what the score would allow, and only that
        (0.01, (ESCALATE,), (Route.ESCALATE, Tier.PREFILTER)),
        (0.60, (ESCALATE,), (Route.ESCALATE, Tier.EMBEDDING)),
        (0.95, (ESCALATE,), (Route.BLOCK, Tier.EMBEDDING)),
        (0.01, (ESCALATE, BLOCK), (Route.BLOCK, Tier.PREFILTER)),
    ],
)
def test_route_for(
    score: float, hits: tuple[PrefilterHit, ...], expected: tuple[Route, Tier]
) -> None:
    assert route_for(score, hits, Thresholds(0.5, 0.9)) == expected


def test_thresholds_must_be_ordered_and_in_range() -> None:
    with pytest.raises(ValueError, match="escalate_at"):
        Thresholds(0.9, 0.5)
    with pytest.raises(ValueError):
        Thresholds(0.5, 1.5)


def test_prefilter_signal_is_a_noisy_or() -> None:
    assert prefilter_signal(()) == 0.0
    assert prefilter_signal((SIGNAL,)) == pytest.approx(0.5)
    assert prefilter_signal((ESCALATE,)) == pytest.approx(0.5)  # its weight counts as a signal
    assert prefilter_signal((SIGNAL, SIGNAL)) == pytest.approx(0.75)
    assert prefilter_signal((BLOCK,)) == 1.0


def neighbors(sims: list[float], risky: list[bool]) -> Neighbors:
    return Neighbors(np.array(sims, dtype=np.float32), np.arange(len(sims)), np.array(risky))


def test_features_from_hand_built_neighbours() -> None:
    evidence = Evidence(np.zeros(4), neighbors([0.9, 0.8, 0.7, 0.1], [True, False, True, True]))
    f = dict(zip(FEATURE_NAMES, features(evidence, temperature=0.05), strict=True))
    assert f["knn_top_risky"] == pytest.approx(0.9)
    assert f["knn_top_benign"] == pytest.approx(0.8)
    assert f["knn_margin"] == pytest.approx(0.1)
    assert f["knn_mean3_risky"] == pytest.approx((0.9 + 0.7 + 0.1) / 3)
    assert 0.5 < f["knn_risky_share"] < 1.0
    assert f["prefilter_signal"] == 0.0 and f["obfuscated"] == 0.0


def test_features_with_no_neighbours_are_zero() -> None:
    evidence = Evidence(np.zeros(4), neighbors([], []))
    assert not features(evidence, temperature=0.05).any()


def test_model_score_is_monotone_in_risky_similarity_and_round_trips(tmp_path: Path) -> None:
    weights = (4.0, -4.0, 0.0, 0.0, 1.0, 2.0, 0.5)
    model = ScoringModel(weights=weights, bias=-2.0, embedding_weights=np.ones(4, dtype=np.float32))
    near = Evidence(np.zeros(4), neighbors([0.9, 0.3], [True, False]))
    far = Evidence(np.zeros(4), neighbors([0.3, 0.9], [True, False]))
    assert 0.0 <= model.score(far) < model.score(near) <= 1.0
    model.save(tmp_path / "m.json")
    loaded = ScoringModel.load(tmp_path / "m.json")
    assert loaded.score(near) == pytest.approx(model.score(near), abs=1e-6)


def test_stale_model_file_is_rejected() -> None:
    with pytest.raises(ValueError, match="fit_scorer"):
        ScoringModel(weights=(1.0,), bias=0.0, feature_names=("old_feature",))


def test_shipped_model_loads() -> None:
    model = ScoringModel.load()
    assert model.embedding_weights is not None and model.k > 0


def test_lowest_threshold_escalates_at_most_the_target_share() -> None:
    scores = np.linspace(0.1, 1.0, 10)
    t = lowest_threshold_at_rate(scores, 0.2)
    assert (scores >= t).mean() == 0.2 and 0.8 < t <= 0.9
    assert (scores >= lowest_threshold_at_rate(scores, 0.0)).mean() == 0.0
    assert lowest_threshold_at_rate(scores, 1.0) == 0.1
    # a rate that is a whole number of rows despite float error (0.29 * 100 = 28.999...)
    many = np.linspace(0.0, 1.0, 100)
    assert (many >= lowest_threshold_at_rate(many, 0.29)).sum() == 29
    assert lowest_threshold_at_rate(np.array([]), 0.1) == 0.0
