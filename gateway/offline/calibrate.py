"""`tierguard calibrate`: thresholds from a platform team's targets, not from raw cosines.

Scores labelled data in process (tiers 0-1, as `tierguard eval` does) and
recommends `escalate_at` for a target recall on risky text or an escalation
budget on ordinary benign text, and `block_at` as the lowest threshold that
blocks at most `max_block_benign` of benign text (hard benign included). It
prints the expected rates per category at those thresholds, the policy snippet
to apply, and can draw the score distributions and the recall / escalation
trade-off.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddings_index.vocabulary import Label, Route
from router.decision import Thresholds, lowest_threshold_at_rate, route_for
from router.evaluation import GroupReport, LabelledText, report_groups
from router.prefilter import PrefilterHit, RuleAction

__all__ = ["Calibration", "calibrate", "plot_calibration", "routes_at"]

# Rules that catch a text whatever its score.
_DECIDING = (RuleAction.BLOCK, RuleAction.ESCALATE)


@dataclass(frozen=True)
class Calibration:
    """Recommended thresholds and what they are expected to do."""

    thresholds: Thresholds
    target: str
    by_category: list[GroupReport]
    overall: GroupReport


def routes_at(
    scores: np.ndarray, hits: Sequence[Sequence[PrefilterHit]], thresholds: Thresholds
) -> list[Route]:
    """The route of every scored text, with its prefilter hits, under `thresholds`."""
    return [
        route_for(float(score), text_hits, thresholds)[0]
        for score, text_hits in zip(scores, hits, strict=True)
    ]


def _threshold_for_recall(risky_scores: np.ndarray, recall: float) -> float:
    """The highest threshold that still catches `recall` of the risky scores."""
    ordered = np.sort(risky_scores)[::-1]
    needed = max(1, math.ceil(recall * len(ordered)))
    return float(ordered[min(needed, len(ordered)) - 1])


def calibrate(
    rows: Sequence[LabelledText],
    scores: Sequence[float],
    hits: Sequence[Sequence[PrefilterHit]],
    *,
    target_recall: float | None = None,
    max_escalation: float | None = None,
    max_block_benign: float = 0.002,
) -> Calibration:
    """Recommend thresholds for exactly one of `target_recall` / `max_escalation`.

    `hits` are each row's prefilter hits: a row a blocking or escalating rule
    caught is caught whatever `escalate_at` is, so it counts as escalated when it
    is chosen; `block_at` sees an escalated row's own score.

    Raises:
        ValueError: neither or both targets, or data without the needed labels.
    """
    if (target_recall is None) == (max_escalation is None):
        raise ValueError("give exactly one of target_recall and max_escalation")
    s = np.asarray(scores, dtype=np.float64)
    forced = np.array(
        [any(h.action in _DECIDING for h in text_hits) for text_hits in hits], dtype=bool
    )
    caught_anyway = np.where(forced, 1.0, s)  # what escalate_at is chosen on
    risky = np.array([r.label == Label.RISKY for r in rows])
    ordinary = np.array([r.label == Label.BENIGN and r.category != "benign_hard" for r in rows])
    benign = ~risky
    if target_recall is not None:
        if not risky.any():
            raise ValueError("a recall target needs risky rows")
        escalate_at = _threshold_for_recall(caught_anyway[risky], target_recall)
        target = f"recall on risky >= {target_recall:g}"
    else:
        if not ordinary.any():
            raise ValueError("an escalation budget needs ordinary benign rows")
        escalate_at = lowest_threshold_at_rate(caught_anyway[ordinary], max_escalation or 0.0)
        target = f"escalation of ordinary benign <= {max_escalation:g}"
    block_at = (
        max(escalate_at, lowest_threshold_at_rate(s[benign], max_block_benign))
        if benign.any()
        else 1.0
    )
    thresholds = Thresholds(min(escalate_at, 1.0), min(block_at, 1.0))
    routes = routes_at(s, hits, thresholds)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_category[row.category].append(i)
    return Calibration(
        thresholds=thresholds,
        target=target,
        by_category=report_groups(rows, routes, s, sorted(by_category.items())),
        overall=report_groups(rows, routes, s, [("all", range(len(rows)))])[0],
    )


def plot_calibration(
    rows: Sequence[LabelledText], scores: Sequence[float], calibration: Calibration, path: Path
) -> None:
    """Score distributions with the thresholds marked, and the recall / escalation curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install 'tierguard[plot]'") from exc
    s = np.asarray(scores, dtype=np.float64)
    groups = {
        "risky": np.array([r.label == Label.RISKY for r in rows]),
        "benign": np.array([r.label == Label.BENIGN and r.category != "benign_hard" for r in rows]),
        "hard benign": np.array([r.category == "benign_hard" for r in rows]),
    }
    colours = {"risky": "#c0392b", "benign": "#2e86c1", "hard benign": "#f39c12"}
    t = calibration.thresholds
    figure, (hist, curve) = plt.subplots(1, 2, figsize=(13, 5))
    bins = np.linspace(0, 1, 41)
    for name, mask in groups.items():
        if mask.any():
            hist.hist(s[mask], bins=bins, density=True, alpha=0.45, color=colours[name],
                      label=f"{name} (n={int(mask.sum())})")  # fmt: skip
    for value, label, style in (
        (t.escalate_at, "escalate_at", "--"),
        (t.block_at, "block_at", ":"),
    ):
        hist.axvline(value, color="black", linestyle=style, label=f"{label} = {value:.3f}")
    hist.set(title="Risk score by label", xlabel="risk score", ylabel="density", yscale="log")
    hist.legend()
    grid = np.unique(np.concatenate([s, [0.0, 1.0]]))
    risky = groups["risky"]
    for name in ("benign", "hard benign"):
        mask = groups[name]
        if mask.any() and risky.any():
            x = [(s[mask] >= g).mean() for g in grid]
            y = [(s[risky] >= g).mean() for g in grid]
            curve.plot(x, y, color=colours[name], label=f"recall vs escalation of {name}")
    overall = calibration.overall
    if overall.escalation_benign is not None and overall.recall_risky is not None:
        curve.scatter([overall.escalation_benign], [overall.recall_risky], color="black", zorder=5,
                      label=f"chosen: recall {overall.recall_risky:.3f}, "
                            f"escalation {overall.escalation_benign:.3f}")  # fmt: skip
    curve.set(title=f"Trade-off ({calibration.target})", xlabel="share of benign escalated",
              ylabel="recall on risky", xscale="log", xlim=(1e-3, 1), ylim=(0, 1.01))  # fmt: skip
    curve.grid(alpha=0.3)
    curve.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
