"""Fitting the scoring model: logistic regression over tier-0/1 evidence. Numpy only.

Used by `scripts/fit_scorer.py` (the shipped weights) and by cross-source
evaluation (refit on every fold). Training texts that are themselves in the
index are scored without their own entry (leave-one-out), so the model never
learns that "similarity 1.0" means anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embeddings_index.faiss_index import ExemplarIndex, Neighbors
from embeddings_index.store import Exemplar
from embeddings_index.vocabulary import Label
from router.normalize import normalize
from router.prefilter import Prefilter
from router.scoring import Evidence, ScoringModel, features, sigmoid
from router.windows import WINDOW_STRIDE, WINDOW_WORDS

PACK_PREFIX = "starter:"

__all__ = [
    "PACK_PREFIX",
    "FitSettings",
    "TrainingExample",
    "design_matrix",
    "evidence_for",
    "fit_logistic",
    "fit_scoring_model",
    "group_weights",
    "group_weights_for",
    "pack_training",
    "settings_matrix",
]


@dataclass(frozen=True, slots=True)
class FitSettings:
    """How the shipped scoring model is fitted (`scripts/fit_scorer.py` defaults).

    Attributes:
        k: Neighbours per text.
        temperature: Softmax temperature of the similarity-weighted risky share.
        embedding_head: Also learn weights on the embedding itself (a linear probe).
        l2: Regularisation strength (per unit of total sample weight).
        pack_share: Weight of the shipped pack within each label (see `group_weights`).
        window_words: Long texts are also scored in windows of this many words
            (0: whole texts only); see `ScoringModel.segments`.
        window_stride: Words between window starts.
    """

    k: int = 10
    temperature: float = 0.05
    embedding_head: bool = True
    l2: float = 10.0
    pack_share: float = 0.7
    window_words: int = WINDOW_WORDS
    window_stride: int = WINDOW_STRIDE


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """One labelled text with its embedding.

    Attributes:
        text: The raw text.
        risky: The label.
        group: Where it came from: a file, or "starter:<category>" for the
            shipped pack (see `group_weights`).
        vector: The embedding of the normalised text.
        index_position: Its own position in the index, if it is an exemplar.
    """

    text: str
    risky: bool
    group: str
    vector: np.ndarray
    index_position: int | None = None


def evidence_for(
    examples: Sequence[TrainingExample], index: ExemplarIndex, prefilter: Prefilter, k: int
) -> list[Evidence]:
    """The evidence the router would see for each example (its own entry left out)."""
    vectors = np.vstack([e.vector for e in examples]).astype(np.float32)
    found = index.search(vectors, k + 1)
    evidence = []
    for example, neighbors in zip(examples, found, strict=True):
        keep = neighbors.positions != (
            example.index_position if example.index_position is not None else -1
        )
        keep &= np.cumsum(keep) <= k
        trimmed = Neighbors(
            neighbors.similarities[keep], neighbors.positions[keep], neighbors.risky[keep]
        )
        normalized = normalize(example.text)
        hits = tuple(prefilter.scan(normalized))
        evidence.append(
            Evidence(example.vector, trimmed, hits, obfuscated=bool(normalized.decoded))
        )
    return evidence


def group_weights(examples: Sequence[TrainingExample], *, pack_share: float = 0.5) -> np.ndarray:
    """Sample weights that keep any one source from dominating.

    Each label carries half the total weight. Within a label, exemplars of the
    shipped pack (groups "starter:...") carry `pack_share` of it and other
    labelled data the rest (all of it when one side is absent); within each
    side, every group weighs the same. Measured leave-one-source-out, an even
    split generalises better than letting the many labelled files outvote the
    pack.
    """
    return group_weights_for(
        [e.risky for e in examples], [e.group for e in examples], pack_share=pack_share
    )


def group_weights_for(
    risky: Sequence[bool] | np.ndarray, groups: Sequence[str], *, pack_share: float = 0.5
) -> np.ndarray:
    """`group_weights` from parallel sequences of labels and groups."""
    pairs = [(bool(r), g) for r, g in zip(risky, groups, strict=True)]
    counts = Counter(pairs)
    sides = Counter((r, g.startswith(PACK_PREFIX)) for r, g in counts)
    weights = np.empty(len(pairs))
    for i, (r, g) in enumerate(pairs):
        from_pack = g.startswith(PACK_PREFIX)
        both_sides = sides[(r, True)] and sides[(r, False)]
        share = (pack_share if from_pack else 1.0 - pack_share) if both_sides else 1.0
        weights[i] = share / (sides[(r, from_pack)] * counts[(r, g)])
    return np.asarray(weights * len(pairs) / weights.sum())


def design_matrix(
    examples: Sequence[TrainingExample],
    evidence: Sequence[Evidence],
    *,
    temperature: float,
    embedding_head: bool,
) -> np.ndarray:
    """One row per example: the named features, then (with the head) the embedding."""
    x = np.vstack([features(ev, temperature=temperature) for ev in evidence])
    if embedding_head:
        x = np.hstack([x, np.vstack([e.vector for e in examples]).astype(np.float64)])
    return x


def settings_matrix(
    examples: Sequence[TrainingExample],
    index: ExemplarIndex,
    prefilter: Prefilter,
    settings: FitSettings,
) -> np.ndarray:
    """`design_matrix` of `examples` with the evidence the router would see (see `FitSettings`)."""
    return design_matrix(
        examples,
        evidence_for(examples, index, prefilter, settings.k),
        temperature=settings.temperature,
        embedding_head=settings.embedding_head,
    )


def pack_training(
    pack: Sequence[Exemplar], vectors: np.ndarray, model_id: str
) -> tuple[ExemplarIndex, list[TrainingExample]]:
    """The starter pack as an index and as training examples (each scored without itself)."""
    index = ExemplarIndex(
        version=1,
        model_id=model_id,
        ids=[e.id for e in pack],
        labels=[e.label for e in pack],
        categories=[e.category for e in pack],
        vectors=vectors,
    )
    examples = [
        TrainingExample(e.text, e.label == Label.RISKY, PACK_PREFIX + e.category, vectors[i], i)
        for i, e in enumerate(pack)
    ]
    return index, examples


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    *,
    l2: float = 1.0,
    iterations: int = 50,
) -> tuple[np.ndarray, float]:
    """Weighted, L2-regularised logistic regression by Newton's method.

    Returns:
        (coefficients, intercept). The intercept is not regularised.
    """
    n, d = x.shape
    design = np.hstack([x, np.ones((n, 1))])
    beta = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    total = weights.sum()
    for _ in range(iterations):
        p = sigmoid(design @ beta)
        gradient = design.T @ (weights * (p - y)) / total + penalty * beta / total
        curvature = weights * p * (1 - p) / total
        hessian = (design * curvature[:, None]).T @ design + np.diag(penalty / total)
        step = np.linalg.solve(hessian + 1e-9 * np.eye(d + 1), gradient)
        beta -= step
        if np.abs(step).max() < 1e-7:
            break
    return beta[:-1], float(beta[-1])


def fit_scoring_model(
    examples: Sequence[TrainingExample],
    index: ExemplarIndex,
    prefilter: Prefilter,
    *,
    settings: FitSettings | None = None,
    fitted_on: str = "",
) -> ScoringModel:
    """Fit a ScoringModel on `examples` against `index` (see `FitSettings`)."""
    settings = settings or FitSettings()
    x = settings_matrix(examples, index, prefilter, settings)
    y = np.array([e.risky for e in examples], dtype=np.float64)
    weights = group_weights(examples, pack_share=settings.pack_share)
    coefficients, intercept = fit_logistic(x, y, weights, l2=settings.l2)
    n_features = x.shape[1] - (index.dim if settings.embedding_head else 0)
    return ScoringModel(
        weights=tuple(float(w) for w in coefficients[:n_features]),
        bias=intercept,
        temperature=settings.temperature,
        k=settings.k,
        embedding_weights=(
            coefficients[n_features:].astype(np.float32) if settings.embedding_head else None
        ),
        fitted_on=fitted_on,
        window_words=settings.window_words,
        window_stride=settings.window_stride,
    )
