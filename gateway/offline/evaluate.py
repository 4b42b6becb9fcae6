"""`tierguard eval` and `tierguard calibrate`: tiers 0 and 1 in process over labelled files.

`evaluate_files` measures the router as configured (in-sample when the scorer
was fitted on the same files); `evaluate_cross_source` measures it
leave-one-source-out (see `router.cross_source`). Neither starts a server or
writes the data directory: `OfflineRouter` reads the exemplars the gateway
would search (the data directory's store when there is one, otherwise the
shipped starter pack) into an in-memory index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from embeddings_index.database import DatabaseError, Storage
from embeddings_index.embedder import Embedder
from embeddings_index.faiss_index import ExemplarIndex
from embeddings_index.starter import load_precomputed_vectors, load_starter_pack
from embeddings_index.store import Exemplar
from embeddings_index.vector_cache import VectorCache
from gateway.runtime.config import Config, Policy
from gateway.runtime.embedding import make_embedder
from router.cross_source import CrossSourceResult, build_corpus, cross_source
from router.evaluation import (
    GroupReport,
    LabelledText,
    read_labelled,
    report_by_file_and_category,
)
from router.normalize import normalized_text
from router.prefilter import Prefilter
from router.router import Router, RouteResult
from router.scoring import DEFAULT_MODEL_PATH, ScoringModel
from router.training import FitSettings

__all__ = [
    "CROSS_SOURCE_CACHE",
    "OfflineRouter",
    "evaluate_cross_source",
    "evaluate_files",
    "format_reports",
]

# Vectors of evaluated texts, under the data directory unless --cache says otherwise.
CROSS_SOURCE_CACHE = "eval-vectors.npz"


@dataclass(frozen=True)
class OfflineRouter:
    """The configured router over an in-memory copy of the gateway's exemplars.

    Attributes:
        config: The configuration it was built from (policies from the file).
        router: Tiers 0 and 1.
        embedder: The configured embedding backend.
        source: Where the exemplars came from, for the report.
    """

    config: Config
    router: Router
    embedder: Embedder
    source: str

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        embedder: Embedder | None = None,
        prefilter: Prefilter | None = None,
        scoring: ScoringModel | None = None,
    ) -> OfflineRouter:
        """Load the model and the exemplars; nothing is written. The shipped rules
        and the configured scorer unless `prefilter` / `scoring` are given."""
        embedder = embedder or make_embedder(config)
        index, source = _read_index(config, embedder)
        router = Router(
            prefilter=prefilter or Prefilter.from_directory(),
            scoring=scoring or ScoringModel.load(config.scoring_model or DEFAULT_MODEL_PATH),
            index=lambda: index,
        )
        return cls(config, router, embedder, source)

    def policy(self, name: str = "") -> Policy:
        """The named policy of the config file, or its default.

        Raises:
            ValueError: no such policy.
        """
        policy = self.config.policy(name or self.config.default_policy)
        if policy is None:
            raise ValueError(
                f"unknown policy {name!r}; the config defines {sorted(self.config.policies)}"
            )
        return policy

    def route_rows(
        self, rows: Sequence[LabelledText], *, policy_name: str = ""
    ) -> list[RouteResult]:
        """Route every row under the named (or default) policy, in batches."""
        policy = self.policy(policy_name)
        results: list[RouteResult] = []
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            results += self.router.route_batch(
                [r.text for r in chunk],
                thresholds=policy.thresholds,
                encode=self.embedder.encode,
                k=policy.k or None,
            )
        return results


def _read_index(config: Config, embedder: Embedder) -> tuple[ExemplarIndex, str]:
    """The live exemplars of the configured store (PostgreSQL at `store.url`, or the
    data directory's SQLite file), else the starter pack. Nothing is written but
    the store's schema, where it is older than this version's."""
    path = config.data_dir / "exemplars.sqlite3"
    exemplars: list[Exemplar]
    if config.store.url is not None or path.is_file():
        storage = Storage(config.store.url, config.data_dir)
        exemplars, vectors, version = _read_store(storage, embedder)
        source = f"{storage.description} (version {version})"
    else:
        exemplars, version = load_starter_pack(), 0
        cache = VectorCache(None, embedder.model_id, known=load_precomputed_vectors())
        vectors = cache.vectors([normalized_text(e.text) for e in exemplars], embedder.encode)
        source = "the shipped starter pack"
    index = ExemplarIndex(
        version=version,
        model_id=embedder.model_id,
        ids=[e.id for e in exemplars],
        labels=[e.label for e in exemplars],
        categories=[e.category for e in exemplars],
        vectors=vectors if len(vectors) else np.zeros((0, embedder.dim), dtype=np.float32),
        options=config.index,
    )
    return index, source


def _read_store(storage: Storage, embedder: Embedder) -> tuple[list[Exemplar], np.ndarray, int]:
    from embeddings_index.store import ExemplarStore

    try:
        store = ExemplarStore(storage.open("exemplars"))
    except DatabaseError as exc:
        raise ValueError(f"cannot read the exemplar store ({storage.description}): {exc}") from exc
    try:
        exemplars, vectors, missing = store.live_vectors(embedder.model_id)
        version = store.version
    finally:
        store.close()
    if missing:  # another model embedded these: embed them in memory, store untouched
        fresh = embedder.encode([normalized_text(e.text) for e in missing])
        exemplars = [*exemplars, *missing]
        vectors = np.vstack([vectors, fresh]) if len(vectors) else fresh
    return exemplars, vectors, version


def evaluate_files(
    config: Config,
    paths: Sequence[Path],
    *,
    policy_name: str = "",
    embedder: Embedder | None = None,
) -> dict[str, list[GroupReport]]:
    """Reports per file, per category and overall for the given labelled files."""
    rows = [row for path in paths for row in read_labelled(path)]
    results = OfflineRouter.create(config, embedder=embedder).route_rows(
        rows, policy_name=policy_name
    )
    return report_by_file_and_category(
        rows, [r.route for r in results], [r.risk_score for r in results]
    )


def evaluate_cross_source(
    config: Config,
    paths: Sequence[Path],
    *,
    policy_name: str = "",
    embedder: Embedder | None = None,
    cache_path: Path | None = None,
    target: float = 0.03,
    groups: int = 0,
) -> CrossSourceResult:
    """Leave-one-source-out over `paths` (or, with `groups`, leave one group of
    sources out): the router and the Vigil-style baseline.

    The index is the shipped starter pack alone; the scorer is refitted per
    fold with the shipped model's k, temperature and windows and
    `scripts/fit_scorer.py`'s other settings (`FitSettings`). Texts are embedded
    by the configured backend and cached in `cache_path` (default: the data
    directory's `eval-vectors.npz`).
    """
    rows = [row for path in paths for row in read_labelled(path)]
    if len({r.file for r in rows}) < 2:
        raise ValueError("--cross-source needs at least two labelled files")
    policy = config.policy(policy_name or config.default_policy)
    if policy is None:
        raise ValueError(f"unknown policy {policy_name!r}")
    if embedder is None:
        embedder = make_embedder(config)
    shipped = ScoringModel.load(config.scoring_model or DEFAULT_MODEL_PATH)
    settings = replace(
        FitSettings(),
        k=policy.k or shipped.k,
        temperature=shipped.temperature,
        embedding_head=shipped.embedding_weights is not None,
        window_words=shipped.window_words,
        window_stride=shipped.window_stride,
    )
    cache = VectorCache(
        cache_path or config.data_dir / CROSS_SOURCE_CACHE,
        embedder.model_id,
        known=load_precomputed_vectors(),
    )
    corpus = build_corpus(
        rows,
        load_starter_pack(),
        cache=cache,
        encode=embedder.encode,
        prefilter=Prefilter.from_directory(),
        settings=settings,
    )
    return cross_source(
        corpus, target=target, policy_escalate_at=policy.thresholds.escalate_at, groups=groups
    )


def format_reports(reports: dict[str, list[GroupReport]]) -> str:
    """The reports as aligned text tables."""
    header = (
        f"{'group':<36} {'n':>6} {'allow':>6} {'escal':>6} {'block':>6} "
        f"{'recall':>7} {'esc_ben':>8} {'esc_hard':>8} {'auroc':>6}"
    )
    lines = []
    for kind, group_reports in reports.items():
        lines += [kind if kind == "overall" else f"by {kind}", header, "-" * len(header)]
        lines += [_row(r) for r in group_reports]
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def _row(r: GroupReport) -> str:
    return (
        f"{r.group[:36]:<36} {r.count:>6} {_fmt(r.allowed, 6)} {_fmt(r.escalated, 6)} "
        f"{_fmt(r.blocked, 6)} {_fmt(r.recall_risky, 7)} {_fmt(r.escalation_benign, 8)} "
        f"{_fmt(r.escalation_benign_hard, 8)} {_fmt(r.auroc, 6)}"
    )
