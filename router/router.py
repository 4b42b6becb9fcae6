"""The router: tiers 0 and 1 for one text, from raw input to a route with evidence.

normalise -> prefilter (a blocking rule ends it here) -> embed -> k nearest
exemplars -> risk score -> route. Each stage is timed. The router knows
nothing of gRPC; the gateway turns a `RouteResult` into a response.

A long text is also embedded in windows (see `ScoringModel.segments`): the
embedder reads only the start of a text, so each window is scored like a text
of its own and the riskiest reading counts; its neighbours are the evidence.

Tier 0 (normalisation, the prefilter, cutting the windows) is CPU work in
proportion to the text: `Router.route` runs it in an executor (the event
loop's default one unless given) for any but a short text, so that one long
or hostile text does not hold up every other caller. Its work is bounded by
`NormalizationLimits`; past them `route` raises `TextTooExpanded`, and for a
text with nothing left after normalisation (only invisible or control
characters) `EmptyAfterNormalization`: both are `TextRejected`, a ValueError
whose message tells the caller what to fix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np

from embeddings_index.faiss_index import ExemplarIndex, Neighbors
from embeddings_index.vocabulary import Route, Tier
from router.decision import Thresholds, route_for
from router.normalize import (
    DEFAULT_LIMITS,
    EmptyAfterNormalization,
    NormalizationLimits,
    NormalizedText,
    normalize,
)
from router.prefilter import Prefilter, PrefilterHit, RuleAction
from router.scoring import Evidence, ScoringModel

__all__ = ["INLINE_MAX_CHARS", "RouteResult", "Router", "Timings"]


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent in each stage of routing."""

    normalize_ms: float = 0.0
    prefilter_ms: float = 0.0
    embed_ms: float = 0.0
    search_ms: float = 0.0

    def stages(self) -> list[tuple[str, float]]:
        """(stage, milliseconds) in the order the router runs them."""
        return [
            ("normalize", self.normalize_ms), ("prefilter", self.prefilter_ms),
            ("embed", self.embed_ms), ("search", self.search_ms),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class RouteResult:
    """Where a text goes and the evidence for it.

    Attributes:
        route: ALLOW, ESCALATE (to the critic tier) or BLOCK.
        decided_by: The tier whose evidence decided the route.
        risk_score: Probability that the text is risky, in [0, 1].
        thresholds: The thresholds that were applied.
        normalized: The text as the tiers read it.
        hits: Prefilter rules that matched.
        neighbors: The nearest exemplars (empty when tier 0 blocked alone).
        index: The index snapshot that was searched (ids, categories, version).
        timings: Time per stage.
        adjusted_because: Set when a caller changed the route from what the score
            says (e.g. raised it for an instruction addressed to the assistant
            inside a tool result): why, in a few words.
    """

    route: Route
    decided_by: Tier
    risk_score: float
    thresholds: Thresholds
    normalized: NormalizedText
    hits: tuple[PrefilterHit, ...]
    neighbors: Neighbors | None
    index: ExemplarIndex
    timings: Timings = field(default_factory=Timings)
    adjusted_because: str = ""

    @property
    def reason(self) -> str:
        """One sentence that says why."""
        if self.adjusted_because:
            return f"{self.adjusted_because} (risk score {self.risk_score:.3f})"
        if self.decided_by is Tier.PREFILTER:
            if self.route is Route.BLOCK:
                rules = ", ".join(h.rule_id for h in self.hits if h.action is RuleAction.BLOCK)
                return f"blocked by prefilter rule {rules}"
            rules = ", ".join(h.rule_id for h in self.hits if h.action is RuleAction.ESCALATE)
            return f"escalated by prefilter rule {rules} (risk score {self.risk_score:.3f})"
        verb = {Route.ALLOW: "below", Route.ESCALATE: "at or above", Route.BLOCK: "at or above"}
        limit = (
            self.thresholds.block_at if self.route is Route.BLOCK else self.thresholds.escalate_at
        )
        name = "block_at" if self.route is Route.BLOCK else "escalate_at"
        return f"risk score {self.risk_score:.3f} is {verb[self.route]} {name} {limit:.3f}"


Embed = Callable[[str], Awaitable[np.ndarray]]

# Below this many characters (a fifth of it for text that is not ASCII, which
# NFKC may lengthen) tier 0 takes well under a millisecond even for a hostile
# text, less than handing it to a thread costs: it runs on the event loop.
INLINE_MAX_CHARS = 1_000


@dataclass(frozen=True, slots=True)
class _Tier0:
    """What tier 0 made of a text, and how long it took."""

    normalized: NormalizedText
    hits: tuple[PrefilterHit, ...]
    segments: list[str]
    normalize_ms: float
    prefilter_ms: float


class Router:
    """Routes texts with one prefilter, one scoring model and the current exemplar index.

    Args:
        prefilter: Tier-0 pattern packs.
        scoring: The model that turns evidence into a risk score.
        index: Returns the index snapshot to search (called once per text, so
            an index swapped in by an admin applies to the next request).
        executor: Runs tier 0 of `route` off the event loop; None: the
            loop's default executor. The caller owns it (and shuts it down).
        limits: Bounds on the work of normalising one text.
        inline_max_chars: Texts up to this long (a fifth of it when not
            ASCII) are normalised on the event loop; 0: none.
    """

    def __init__(
        self,
        *,
        prefilter: Prefilter,
        scoring: ScoringModel,
        index: Callable[[], ExemplarIndex],
        executor: Executor | None = None,
        limits: NormalizationLimits = DEFAULT_LIMITS,
        inline_max_chars: int = INLINE_MAX_CHARS,
    ) -> None:
        self._prefilter = prefilter
        self._scoring = scoring
        self._index = index
        self._executor = executor
        self._limits = limits
        self._inline_max_chars = inline_max_chars

    @property
    def scoring(self) -> ScoringModel:
        """The scoring model in use."""
        return self._scoring

    @property
    def limits(self) -> NormalizationLimits:
        """The bounds on normalising one text."""
        return self._limits

    async def route(
        self, text: str, *, thresholds: Thresholds, embed: Embed, k: int | None = None
    ) -> RouteResult:
        """Route one text; `embed` turns the normalised text into its unit vector.

        Raises:
            TextTooExpanded: normalising the text would go past the router's
                `NormalizationLimits` (a ValueError saying what to fix).
            EmptyAfterNormalization: nothing but invisible or control
                characters and whitespace (a ValueError).
        """
        if self._inline(text):
            tier0 = self._tier0(text)
        else:
            loop = asyncio.get_running_loop()
            tier0 = await loop.run_in_executor(self._executor, self._tier0, text)
        normalized, hits = tier0.normalized, tier0.hits
        index = self._index()
        if any(hit.action is RuleAction.BLOCK for hit in hits):
            return self._tier0_block(tier0, thresholds, index)
        t_pre = time.perf_counter()
        readings = (normalized.text, *tier0.segments)
        vectors = await asyncio.gather(*(embed(reading) for reading in readings))
        t_embed = time.perf_counter()
        stacked = np.vstack(vectors)
        neighbors = index.search(stacked, k or self._scoring.k)
        result = self._decide(normalized, hits, stacked, neighbors, thresholds, index)
        timings = Timings(
            normalize_ms=tier0.normalize_ms,
            prefilter_ms=tier0.prefilter_ms,
            embed_ms=_ms(t_pre, t_embed),
            search_ms=_ms(t_embed, time.perf_counter()),
        )
        return replace(result, timings=timings)

    def _inline(self, text: str) -> bool:
        limit = self._inline_max_chars if text.isascii() else self._inline_max_chars // 5
        return len(text) <= limit

    def _tier0(self, text: str) -> _Tier0:
        """Normalise, scan and cut the windows of one text (CPU only; any thread)."""
        start = time.perf_counter()
        normalized = normalize(text, limits=self._limits)
        if not normalized.text:
            raise EmptyAfterNormalization(len(text))
        t_norm = time.perf_counter()
        hits = tuple(self._prefilter.scan(normalized))
        t_pre = time.perf_counter()
        blocked = any(hit.action is RuleAction.BLOCK for hit in hits)
        segments = [] if blocked else self._scoring.segments(normalized.text)
        return _Tier0(normalized, hits, segments, _ms(start, t_norm), _ms(t_norm, t_pre))

    def route_batch(
        self,
        texts: Sequence[str],
        *,
        thresholds: Thresholds,
        encode: Callable[[list[str]], np.ndarray],
        k: int | None = None,
    ) -> list[RouteResult]:
        """Route many texts in process with one call to `encode` (for evaluation).

        Raises:
            TextTooExpanded: a text would go past the router's `NormalizationLimits`.
        """
        normalized = [normalize(t, limits=self._limits) for t in texts]
        hits = [tuple(self._prefilter.scan(n)) for n in normalized]
        index = self._index()
        readings = [[n.text, *self._scoring.segments(n.text)] for n in normalized]
        flat = [reading for group in readings for reading in group]
        vectors = encode(flat) if flat else np.zeros((0, index.dim), dtype=np.float32)
        all_neighbors = index.search(vectors, k or self._scoring.k)
        results = []
        start = 0
        for n, h, group in zip(normalized, hits, readings, strict=True):
            end = start + len(group)
            results.append(
                self._decide(n, h, vectors[start:end], all_neighbors[start:end], thresholds, index)
            )
            start = end
        return results

    def _decide(
        self,
        normalized: NormalizedText,
        hits: tuple[PrefilterHit, ...],
        vectors: np.ndarray,
        neighbors: Sequence[Neighbors],
        thresholds: Thresholds,
        index: ExemplarIndex,
    ) -> RouteResult:
        """Score the whole text (row 0) and its windows (rows 1..); the riskiest counts."""
        obfuscated = bool(normalized.decoded)
        scores = [
            self._scoring.score(Evidence(vector, found, hits, obfuscated=obfuscated))
            for vector, found in zip(vectors, neighbors, strict=True)
        ]
        best = int(np.argmax(scores))
        score = scores[best]
        route, tier = route_for(score, hits, thresholds)
        return RouteResult(route, tier, score, thresholds, normalized, hits, neighbors[best], index)

    @staticmethod
    def _tier0_block(tier0: _Tier0, thresholds: Thresholds, index: ExemplarIndex) -> RouteResult:
        timings = Timings(normalize_ms=tier0.normalize_ms, prefilter_ms=tier0.prefilter_ms)
        return RouteResult(
            Route.BLOCK, Tier.PREFILTER, 1.0, thresholds, tier0.normalized, tier0.hits, None,
            index, timings,
        )  # fmt: skip


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0
