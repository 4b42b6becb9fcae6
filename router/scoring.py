"""Risk scoring: tier-0 and tier-1 evidence in, one calibrated probability out. Pure.

The evidence is the k nearest exemplars (risky and benign), the prefilter hits
and the normalisation steps; optionally the embedding itself. `features` turns
it into a short, named vector and `ScoringModel` is a logistic regression over
it, so the score is a probability in [0, 1] that thresholds can be set on.
The weights ship in `router/scoring_model.json`; `scripts/fit_scorer.py`
reproduces them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embeddings_index.faiss_index import Neighbors
from router.prefilter import PrefilterHit, RuleAction
from router.windows import windows

__all__ = [
    "DEFAULT_MODEL_PATH",
    "FEATURE_NAMES",
    "Evidence",
    "ScoringModel",
    "features",
    "prefilter_signal",
    "sigmoid",
]

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "scoring_model.json"

FEATURE_NAMES = (
    "knn_top_risky",
    "knn_top_benign",
    "knn_margin",
    "knn_mean3_risky",
    "knn_risky_share",
    "prefilter_signal",
    "obfuscated",
)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the tiers found out about one text."""

    vector: np.ndarray
    neighbors: Neighbors
    hits: Sequence[PrefilterHit] = ()
    obfuscated: bool = False


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """The logistic function, clipped so that no logit overflows."""
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0))))


def prefilter_signal(hits: Sequence[PrefilterHit]) -> float:
    """Noisy-OR of the signal weights: two weak hits weigh more than one, never above 1."""
    keep = 1.0
    for hit in hits:
        keep *= 1.0 - (1.0 if hit.action is RuleAction.BLOCK else hit.weight)
    return 1.0 - keep


def features(evidence: Evidence, *, temperature: float) -> np.ndarray:
    """The named feature vector (see FEATURE_NAMES) of one text's evidence."""
    sims = evidence.neighbors.similarities.astype(np.float64)
    risky = evidence.neighbors.risky.astype(bool)
    risky_sims = sims[risky]
    benign_sims = sims[~risky]
    top_risky = float(risky_sims[0]) if len(risky_sims) else 0.0
    top_benign = float(benign_sims[0]) if len(benign_sims) else 0.0
    mean3_risky = float(np.pad(risky_sims[:3], (0, max(0, 3 - len(risky_sims[:3])))).mean())
    if len(sims):
        weights = np.exp((sims - sims.max()) / temperature)
        risky_share = float(weights[risky].sum() / weights.sum())
    else:
        risky_share = 0.0
    return np.array(
        [
            top_risky,
            top_benign,
            top_risky - top_benign,
            mean3_risky,
            risky_share,
            prefilter_signal(evidence.hits),
            1.0 if evidence.obfuscated else 0.0,
        ]
    )


@dataclass(frozen=True)
class ScoringModel:
    """Logistic regression over `features` (and, optionally, a projection of the embedding).

    Attributes:
        weights: One weight per name in `feature_names`.
        bias: The intercept.
        temperature: Softmax temperature of the similarity-weighted risky share.
        k: How many neighbours the features were fitted with.
        embedding_weights: Weights on the embedding itself, or None.
        feature_names: Must equal FEATURE_NAMES; kept to catch stale files.
        fitted_on: Free text: what data and script produced the weights.
        window_words: A text longer than this many words (plus a quarter) is
            also scored in windows of this many words, and its score is the
            highest of the whole and the windows; 0 scores the whole text only.
        window_stride: Words between window starts.
    """

    weights: tuple[float, ...]
    bias: float
    temperature: float = 0.05
    k: int = 10
    embedding_weights: np.ndarray | None = field(default=None, repr=False)
    feature_names: tuple[str, ...] = FEATURE_NAMES
    fitted_on: str = ""
    window_words: int = 0
    window_stride: int = 0

    def __post_init__(self) -> None:
        if tuple(self.feature_names) != FEATURE_NAMES:
            raise ValueError(
                f"scoring model features {list(self.feature_names)} do not match this "
                f"version's {list(FEATURE_NAMES)}: refit with scripts/fit_scorer.py"
            )
        if len(self.weights) != len(FEATURE_NAMES):
            raise ValueError(f"scoring model needs {len(FEATURE_NAMES)} weights")
        if self.window_words and not 0 < self.window_stride <= self.window_words:
            raise ValueError("scoring model needs 0 < window_stride <= window_words")

    def segments(self, text: str) -> list[str]:
        """The windows of `text` this model also scores (none for a short text)."""
        if not self.window_words:
            return []
        return windows(text, size=self.window_words, stride=self.window_stride)

    def logit(self, evidence: Evidence) -> float:
        """The log-odds that the text is risky."""
        z = self.bias + float(
            np.dot(self.weights, features(evidence, temperature=self.temperature))
        )
        if self.embedding_weights is not None:
            z += float(np.dot(self.embedding_weights, evidence.vector))
        return z

    def score(self, evidence: Evidence) -> float:
        """The probability that the text is risky, in [0, 1]."""
        return float(sigmoid(self.logit(evidence)))

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> ScoringModel:
        """Read a model written by `save`."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        embedding = raw.get("embedding_weights")
        return cls(
            weights=tuple(float(w) for w in raw["weights"]),
            bias=float(raw["bias"]),
            temperature=float(raw.get("temperature", 0.05)),
            k=int(raw.get("k", 10)),
            embedding_weights=np.asarray(embedding, dtype=np.float32) if embedding else None,
            feature_names=tuple(raw.get("feature_names", FEATURE_NAMES)),
            fitted_on=str(raw.get("fitted_on", "")),
            window_words=int(raw.get("window_words", 0)),
            window_stride=int(raw.get("window_stride", 0)),
        )

    def save(self, path: Path) -> None:
        """Write the model as JSON."""
        raw = {
            "feature_names": list(self.feature_names),
            "weights": [round(w, 6) for w in self.weights],
            "bias": round(self.bias, 6),
            "temperature": self.temperature,
            "k": self.k,
            "fitted_on": self.fitted_on,
            "window_words": self.window_words,
            "window_stride": self.window_stride,
            "embedding_weights": (
                [round(float(w), 6) for w in self.embedding_weights]
                if self.embedding_weights is not None
                else None
            ),
        }
        Path(path).write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
