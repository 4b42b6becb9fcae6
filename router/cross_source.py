"""Cross-source evaluation: how the router does on a source of traffic it never saw.

Leave one source out. For each labelled file F:

* the index is the shipped starter pack only (what a fresh gateway holds; the
  other files' texts are *not* added to it, because the shipped index never
  holds them);
* the scoring model is fitted as `scripts/fit_scorer.py` fits it, on the
  starter pack plus every labelled file except F;
* `escalate_at` is chosen on the other files (`router.decision.lowest_threshold_at_rate`): the lowest
  score that escalates at most the target share (3%) of their ordinary-benign
  texts, where each of those files is scored by a model fitted without it
  (nested leave-one-source-out), so the threshold reflects how the scorer
  behaves on unseen traffic rather than on the traffic it was fitted on;
* then F is scored and cut at that threshold.

A text counts as caught when its score reaches the threshold or a blocking or
escalating prefilter rule fires (its score is then taken as 1.0).

The same splits run the Vigil-style baseline: all-MiniLM-L6-v2 vectors, an
index of every risky text of the other files, flag when the nearest one is
within cosine distance 0.4 (similarity >= 0.6), and the same baseline with
its threshold chosen by the rule above.

With `groups=K` the unit held out is a group of sources instead of one file
(`group_sources`: K groups, sources with risky rows dealt round-robin, then
the benign-only ones, so every group holds both kinds where it can): the
scorer of a held-out group never saw any file of it, and its threshold comes
from the other groups. K folds instead of one per file make the nested
calibration affordable (K + K(K-1) fits instead of n + n(n-1)), and a whole
group of unseen sources is closer to unseen traffic than one file. Every rule
reports the worst held-out group's recall and the worst ordinary-benign
source's escalation beside the pooled figures.

Everything here is pure given the vectors; a `VectorCache` keeps them on disk,
so a run embeds each text once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

import numpy as np

from embeddings_index.store import Exemplar
from embeddings_index.vector_cache import VectorCache
from embeddings_index.vocabulary import Label, Route
from router.decision import lowest_threshold_at_rate
from router.evaluation import (
    GroupReport,
    LabelledText,
    report_by_file_and_category,
    report_groups,
)
from router.normalize import normalize
from router.prefilter import Prefilter, RuleAction
from router.scoring import sigmoid
from router.training import (
    FitSettings,
    TrainingExample,
    fit_logistic,
    group_weights_for,
    pack_training,
    settings_matrix,
)
from router.windows import windows

__all__ = [
    "Corpus",
    "CrossSourceResult",
    "FoldedScores",
    "RuleResult",
    "build_corpus",
    "cross_source",
    "cut",
    "format_cross_source",
    "group_sources",
    "leave_one_source_out",
    "quantile_thresholds",
    "router_method",
    "vigil_method",
]

Encode = Callable[[list[str]], np.ndarray]
# A fitted method: row indices of the corpus -> risk scores.
Scorer = Callable[[np.ndarray], np.ndarray]
# A method: the files it may learn from -> a fitted scorer.
Method = Callable[[frozenset[str]], Scorer]


@dataclass(frozen=True)
class Corpus:
    """Everything a cross-source run needs, computed once.

    Attributes:
        rows: The labelled texts.
        files: The file (source) of each row.
        risky: Label of each row.
        hard: True for `benign_hard` rows.
        blocked: A blocking or escalating prefilter rule fires on the row (it is
            caught whatever its score; it scores 1.0, as the router ranks it).
        vectors: Embedding of each row's normalised text.
        x: The router's design matrix for each row (features against the
            starter-pack index, then the embedding).
        pack_x: The same for each starter exemplar, scored without its own entry.
        pack_risky: Label of each starter exemplar.
        pack_groups: "starter:<category>" of each starter exemplar.
        settings: How the scorer is fitted.
        segment_x: Design rows of the windows of long rows (see
            `ScoringModel.segments`); a row's score is the highest of its own
            and its windows'.
        segment_owner: The row each window belongs to.
    """

    rows: Sequence[LabelledText]
    files: np.ndarray
    risky: np.ndarray
    hard: np.ndarray
    blocked: np.ndarray
    vectors: np.ndarray
    x: np.ndarray
    pack_x: np.ndarray
    pack_risky: np.ndarray
    pack_groups: Sequence[str]
    settings: FitSettings = field(default_factory=FitSettings)
    segment_x: np.ndarray | None = None
    segment_owner: np.ndarray | None = None

    @property
    def file_names(self) -> list[str]:
        """The distinct files, sorted."""
        return sorted(set(self.files.tolist()))

    def ordinary_benign(self, indices: np.ndarray) -> np.ndarray:
        """The ordinary-benign rows (label benign, not benign_hard) among `indices`."""
        keep = ~self.risky[indices] & ~self.hard[indices]
        return np.asarray(indices[keep])


def build_corpus(
    rows: Sequence[LabelledText],
    pack: Sequence[Exemplar],
    *,
    cache: VectorCache,
    encode: Encode,
    prefilter: Prefilter,
    settings: FitSettings | None = None,
) -> Corpus:
    """Embed (through the cache) and extract the router's evidence for rows and pack.

    Give the cache the shipped starter-pack vectors as `known` to score the pack
    with the vectors the router uses at run time.
    """
    settings = settings or FitSettings()
    normalized_rows = [normalize(r.text) for r in rows]
    normalized_pack = [normalize(e.text) for e in pack]
    v_pack = cache.vectors([n.text for n in normalized_pack], encode)
    v_rows = cache.vectors([n.text for n in normalized_rows], encode)
    segments = [
        windows(n.text, size=settings.window_words, stride=settings.window_stride)
        if settings.window_words
        else []
        for n in normalized_rows
    ]
    owners = np.array([i for i, group in enumerate(segments) for _ in group], dtype=np.int64)
    flat = [s for group in segments for s in group]
    v_segments = cache.vectors(flat, encode) if flat else None
    cache.save()
    index, pack_examples = pack_training(pack, v_pack, cache.model_id)
    row_examples = [
        TrainingExample(r.text, r.label == Label.RISKY, r.file, v_rows[i])
        for i, r in enumerate(rows)
    ]

    def matrix(examples: list[TrainingExample]) -> np.ndarray:
        return settings_matrix(examples, index, prefilter, settings)

    segment_x = None
    if v_segments is not None:
        segment_examples = [
            TrainingExample(rows[o].text, rows[o].label == Label.RISKY, rows[o].file, v_segments[j])
            for j, o in enumerate(owners)
        ]
        # Each window carries its whole text's prefilter hits (the example's
        # text is the whole text), as in the router.
        segment_x = matrix(segment_examples)
    blocked = np.array(
        [
            any(h.action in (RuleAction.BLOCK, RuleAction.ESCALATE) for h in prefilter.scan(n))
            for n in normalized_rows
        ],
        dtype=bool,
    )
    return Corpus(
        rows=list(rows),
        files=np.array([r.file for r in rows]),
        risky=np.array([r.label == Label.RISKY for r in rows], dtype=bool),
        hard=np.array([r.category == "benign_hard" for r in rows], dtype=bool),
        blocked=blocked,
        vectors=v_rows,
        x=matrix(row_examples),
        pack_x=matrix(pack_examples),
        pack_risky=np.array([e.risky for e in pack_examples], dtype=bool),
        pack_groups=[e.group for e in pack_examples],
        settings=settings,
        segment_x=segment_x,
        segment_owner=owners if segment_x is not None else None,
    )


def router_method(corpus: Corpus) -> Method:
    """The router as shipped: the scorer fitted on the pack plus the allowed files.

    A row scores the highest of its whole text and its windows; rows a
    blocking prefilter rule catches score 1.0, as the router reports them.
    """
    settings = corpus.settings

    def fit(train_files: frozenset[str]) -> Scorer:
        mask = np.isin(corpus.files, sorted(train_files))
        x = np.vstack([corpus.pack_x, corpus.x[mask]])
        y = np.concatenate([corpus.pack_risky, corpus.risky[mask]]).astype(np.float64)
        groups = list(corpus.pack_groups) + corpus.files[mask].tolist()
        weights = group_weights_for(y.astype(bool), groups, pack_share=settings.pack_share)
        coefficients, intercept = fit_logistic(x, y, weights, l2=settings.l2)

        def score(indices: np.ndarray) -> np.ndarray:
            s = sigmoid(corpus.x[indices] @ coefficients + intercept)
            if corpus.segment_x is not None and corpus.segment_owner is not None:
                position = np.full(len(corpus.rows), -1)
                position[indices] = np.arange(len(indices))
                mine = position[corpus.segment_owner] >= 0
                if mine.any():
                    windows = sigmoid(corpus.segment_x[mine] @ coefficients + intercept)
                    np.maximum.at(s, position[corpus.segment_owner[mine]], windows)
            return np.where(corpus.blocked[indices], 1.0, s)

        return score

    return fit


def vigil_method(corpus: Corpus) -> Method:
    """Vigil-style: cosine similarity to the nearest risky text of the allowed files."""

    def fit(train_files: frozenset[str]) -> Scorer:
        mask = np.isin(corpus.files, sorted(train_files)) & corpus.risky
        bank = corpus.vectors[mask]

        def score(indices: np.ndarray) -> np.ndarray:
            if not len(bank):
                return np.zeros(len(indices))
            sims = np.empty(len(indices))
            for start in range(0, len(indices), 1024):
                chunk = corpus.vectors[indices[start : start + 1024]]
                sims[start : start + 1024] = (chunk @ bank.T).max(axis=1)
            return sims

        return score

    return fit


@dataclass(frozen=True)
class FoldedScores:
    """A method's held-out scores and, per fold, its calibration scores.

    Attributes:
        scores: Each row's score by the model fitted without the row's unit.
        calibration: Per held-out unit, the ordinary-benign scores of the other
            units, each scored by a model fitted without it and without the
            held-out unit (nested: the held-out unit never sets its own threshold).
        unit_of: The unit (a file, or a group of files) each file is held out in.
    """

    scores: np.ndarray
    calibration: Mapping[str, np.ndarray]
    unit_of: Mapping[str, str] = field(default_factory=dict)


def deal_sources(files: Iterable[str], with_risky: Set[str], count: int) -> dict[str, str]:
    """`count` groups of `files`: those in `with_risky` dealt round-robin in name
    order, then the benign-only ones, continuing the deal ("group 1", ...). The
    one deal every report by groups uses, so "group 3" names the same files in each."""
    if count < 2:
        raise ValueError("groups: at least 2")
    names = sorted(set(files))
    order = [f for f in names if f in with_risky] + [f for f in names if f not in with_risky]
    return {f: f"group {i % count + 1}" for i, f in enumerate(order)}


def group_sources(corpus: Corpus, count: int) -> dict[str, str]:
    """`deal_sources` over the corpus's files."""
    risky = {f for f in corpus.file_names if corpus.risky[corpus.files == f].any()}
    return deal_sources(corpus.file_names, risky, count)


def leave_one_source_out(
    corpus: Corpus, method: Method, groups: Mapping[str, str] | None = None
) -> FoldedScores:
    """Score every unit (a file, or with `groups` a group of files) with `method`
    fitted on the others, plus nested calibration scores."""
    unit_of = dict(groups) if groups else {f: f for f in corpus.file_names}
    units = sorted(set(unit_of.values()))
    files_of = {u: frozenset(f for f, g in unit_of.items() if g == u) for u in units}
    everything = frozenset(corpus.file_names)
    fitted: dict[frozenset[str], Scorer] = {}

    def scorer(excluded_units: frozenset[str]) -> Scorer:
        if excluded_units not in fitted:
            excluded = frozenset().union(*(files_of[u] for u in excluded_units))
            fitted[excluded_units] = method(everything - excluded)
        return fitted[excluded_units]

    rows_of = {u: np.flatnonzero(np.isin(corpus.files, list(files_of[u]))) for u in units}
    benign_of = {u: corpus.ordinary_benign(rows_of[u]) for u in units}
    scores = np.full(len(corpus.rows), np.nan)
    calibration: dict[str, np.ndarray] = {}
    for held_out in units:
        scores[rows_of[held_out]] = scorer(frozenset({held_out}))(rows_of[held_out])
        parts = [
            scorer(frozenset({held_out, other}))(benign_of[other])
            for other in units
            if other != held_out and len(benign_of[other])
        ]
        calibration[held_out] = np.concatenate(parts) if parts else np.zeros(0)
    return FoldedScores(scores, calibration, unit_of)


@dataclass(frozen=True)
class RuleResult:
    """One method cut by one threshold rule, reported per held-out file and overall.

    Attributes:
        name: Method and rule, e.g. "router, escalate_at = 3% benign quantile".
        thresholds: The threshold applied to each held-out file.
        files: One report per held-out file.
        overall: All held-out rows pooled (each scored by its own fold's model).
        categories: Pooled, per category.
        units: One report per held-out group (empty when each file is its own unit).
    """

    name: str
    thresholds: Mapping[str, float]
    files: Sequence[GroupReport]
    overall: GroupReport
    categories: Sequence[GroupReport]
    units: Sequence[GroupReport] = ()

    @property
    def worst_recall(self) -> GroupReport | None:
        """The held-out unit (group, else file) with risky rows caught least."""
        units = [r for r in (self.units or self.files) if r.recall_risky is not None]
        return min(units, key=lambda r: r.recall_risky or 0.0, default=None)

    @property
    def worst_benign(self) -> GroupReport | None:
        """The source whose ordinary benign rows are escalated most."""
        files = [r for r in self.files if r.escalation_benign is not None]
        return max(files, key=lambda r: r.escalation_benign or 0.0, default=None)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values."""
        worst_recall, worst_benign = self.worst_recall, self.worst_benign
        return {
            "name": self.name,
            "thresholds": dict(self.thresholds),
            "files": [r.as_dict() for r in self.files],
            "units": [r.as_dict() for r in self.units],
            "overall": self.overall.as_dict(),
            "categories": [r.as_dict() for r in self.categories],
            "worst_recall": worst_recall.as_dict() if worst_recall else None,
            "worst_benign": worst_benign.as_dict() if worst_benign else None,
        }


def cut(
    corpus: Corpus,
    folded: FoldedScores,
    thresholds: Mapping[str, float],
    name: str,
) -> RuleResult:
    """Route every row at its fold's threshold (`thresholds` by held-out unit) and report."""
    unit_of = folded.unit_of or {f: f for f in corpus.file_names}
    per_file = {f: thresholds[unit_of[f]] for f in corpus.file_names}
    t = np.array([per_file[f] for f in corpus.files.tolist()])
    caught = folded.scores >= t
    routes = [Route.ESCALATE if c else Route.ALLOW for c in caught]
    reports = report_by_file_and_category(corpus.rows, routes, folded.scores.tolist())
    units: list[GroupReport] = []
    if any(u != f for f, u in unit_of.items()):
        members = defaultdict(list)
        for i, f in enumerate(corpus.files.tolist()):
            members[unit_of[f]].append(i)
        units = report_groups(corpus.rows, routes, folded.scores.tolist(), sorted(members.items()))
    return RuleResult(
        name=name,
        thresholds=per_file,
        files=reports["file"],
        overall=reports["overall"][0],
        categories=reports["category"],
        units=units,
    )


def quantile_thresholds(folded: FoldedScores, target: float) -> dict[str, float]:
    """Per held-out file: `lowest_threshold_at_rate` of its nested calibration scores."""
    return {f: lowest_threshold_at_rate(s, target) for f, s in folded.calibration.items()}


@dataclass(frozen=True)
class CrossSourceResult:
    """All rules of one cross-source run (router first, then the baselines)."""

    target: float
    results: Sequence[RuleResult]
    groups: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values."""
        return {
            "target_benign_escalation": self.target,
            "held_out": "groups of sources" if self.groups else "one source at a time",
            "groups": dict(self.groups),
            "results": [r.as_dict() for r in self.results],
        }


def cross_source(
    corpus: Corpus,
    *,
    target: float = 0.03,
    policy_escalate_at: float | None = None,
    vigil_max_distance: float = 0.4,
    extra_methods: Iterable[tuple[str, Method]] = (),
    groups: int = 0,
) -> CrossSourceResult:
    """The router and the Vigil-style baseline, held out on the same splits.

    Args:
        groups: Hold out groups of sources (`group_sources`) instead of one file
            at a time; 0: one file at a time.
        target: Share of ordinary-benign training traffic `escalate_at` may escalate.
        policy_escalate_at: Also report the router at this fixed threshold.
        vigil_max_distance: The baseline flags at cosine distance <= this.
        extra_methods: More (name, method) pairs to run on the same splits.
    """
    pct = f"{target * 100:g}%"
    results = []
    grouping = group_sources(corpus, groups) if groups else None
    methods = [("router", router_method(corpus)), *extra_methods]
    for name, method in methods:
        folded = leave_one_source_out(corpus, method, grouping)
        results.append(
            cut(corpus, folded, quantile_thresholds(folded, target), f"{name} @ {pct} benign")
        )
        if policy_escalate_at is not None and name == "router":
            fixed = dict.fromkeys(folded.calibration, policy_escalate_at)
            results.append(
                cut(corpus, folded, fixed, f"{name} @ policy escalate_at {policy_escalate_at:g}")
            )
    vigil = leave_one_source_out(corpus, vigil_method(corpus), grouping)
    similarity = 1.0 - vigil_max_distance
    results.append(
        cut(
            corpus,
            vigil,
            dict.fromkeys(vigil.calibration, similarity),
            f"vigil @ distance <= {vigil_max_distance:g}",
        )
    )
    results.append(cut(corpus, vigil, quantile_thresholds(vigil, target), f"vigil @ {pct} benign"))
    return CrossSourceResult(target, results, grouping or {})


def _fmt(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def format_cross_source(result: CrossSourceResult, *, categories: bool = True) -> str:
    """Aligned text tables: per method and rule, per held-out file (and group), the
    pooled figures, the worst held-out group's recall and the worst benign source."""
    header = (
        f"{'held-out file':<36} {'n':>6} {'thresh':>7} {'recall':>7} "
        f"{'esc_ben':>8} {'esc_hard':>8} {'auroc':>6}"
    )
    lines = []
    if result.groups:
        count = len(set(result.groups.values()))
        lines.append(f"held out: {count} groups of sources (each fold never saw its group)")
        for group in sorted(set(result.groups.values())):
            members = sorted(f for f, g in result.groups.items() if g == group)
            lines.append(f"  {group}: {', '.join(members)}")
        lines.append("")
    for rule in result.results:
        lines += [rule.name, header, "-" * len(header)]
        for r in rule.files:
            t = rule.thresholds.get(r.group)
            lines.append(_line(r, t))
        if rule.units:
            lines.append("")
            lines += [_line(r, None, prefix="held-out ") for r in rule.units]
        if categories:
            lines.append("")
            lines += [_line(r, None, prefix="category ") for r in rule.categories]
        lines.append("-" * len(header))
        lines.append(_line(rule.overall, None, name="overall (pooled)"))
        lines.append("")
    lines.append("summary (pooled over held-out files)")
    lines.append("worst_rec: the held-out unit caught least; worst_ben: the source escalated most")
    summary = (
        f"{'method @ rule':<44} {'recall':>7} {'esc_ben':>8} {'esc_hard':>8} {'auroc':>6} "
        f"{'worst_rec':>9} {'worst_ben':>9}"
    )
    lines += [summary, "-" * len(summary)]
    for rule in result.results:
        o, wr, wb = rule.overall, rule.worst_recall, rule.worst_benign
        lines.append(
            f"{rule.name[:44]:<44} {_fmt(o.recall_risky, 7)} {_fmt(o.escalation_benign, 8)} "
            f"{_fmt(o.escalation_benign_hard, 8)} {_fmt(o.auroc, 6)} "
            f"{_fmt(wr.recall_risky if wr else None, 9)} "
            f"{_fmt(wb.escalation_benign if wb else None, 9)}"
        )
    worst = [
        f"  {rule.name}: worst recall {rule.worst_recall.group if rule.worst_recall else '-'}; "
        f"worst benign {rule.worst_benign.group if rule.worst_benign else '-'}"
        for rule in result.results
    ]
    return "\n".join([*lines, "", "worst units:", *worst])


def _line(r: GroupReport, t: float | None, *, prefix: str = "", name: str | None = None) -> str:
    label = (name or prefix + r.group)[:36]
    return (
        f"{label:<36} {r.count:>6} {_fmt(t, 7)} {_fmt(r.recall_risky, 7)} "
        f"{_fmt(r.escalation_benign, 8)} {_fmt(r.escalation_benign_hard, 8)} {_fmt(r.auroc, 6)}"
    )
