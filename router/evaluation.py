"""Routing quality on labelled data: the numbers thresholds are chosen by. Pure.

Recall counts a risky text as caught when it is escalated or blocked; the
escalation rate of benign text counts the same (both cost a critic call or a
refusal). AUROC measures the risk score alone, independent of thresholds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddings_index.vocabulary import Label, Route

__all__ = [
    "GroupReport",
    "LabelledText",
    "auroc",
    "read_labelled",
    "report_by_file_and_category",
    "report_groups",
]


@dataclass(frozen=True, slots=True)
class LabelledText:
    """One row of a labelled JSONL file (see DESIGN.md, "Data formats")."""

    id: str
    text: str
    label: str
    category: str
    source: str
    file: str


def read_labelled(path: Path) -> list[LabelledText]:
    """Read a labelled JSONL file; raises ValueError naming the line at fault."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            label = raw["label"]
            if label not in tuple(Label):
                raise ValueError(f"label must be 'risky' or 'benign', got {label!r}")
            rows.append(
                LabelledText(
                    id=str(raw.get("id", f"{Path(path).stem}-{number}")),
                    text=str(raw["text"]),
                    label=label,
                    category=str(raw.get("category", label)),
                    source=str(raw.get("source", "")),
                    file=Path(path).name,
                )
            )
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
    return rows


def auroc(scores: Sequence[float] | np.ndarray, risky: Sequence[bool] | np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None unless both classes are present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(risky, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_scores = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count - 1) / 2.0
    return float((ranks[y].sum() - positives * (positives - 1) / 2.0) / (positives * negatives))


@dataclass(frozen=True, slots=True)
class GroupReport:
    """Outcomes of one group of texts (a file, a category, or everything)."""

    group: str
    count: int
    allowed: float
    escalated: float
    blocked: float
    recall_risky: float | None
    escalation_benign: float | None
    escalation_benign_hard: float | None
    auroc: float | None

    def as_dict(self) -> dict[str, object]:
        """The report as plain JSON-ready values."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _rate(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def report_groups(
    rows: Sequence[LabelledText],
    routes: Sequence[Route],
    scores: Sequence[float] | np.ndarray,
    groups: Iterable[tuple[str, Sequence[int]]],
) -> list[GroupReport]:
    """One report per (name, row indices) group."""
    route_arr = np.array([r.value for r in routes])
    score_arr = np.asarray(scores, dtype=np.float64)
    risky = np.array([r.label == Label.RISKY for r in rows])
    hard = np.array([r.category == "benign_hard" for r in rows])
    caught = route_arr != Route.ALLOW.value
    reports = []
    for name, indices in groups:
        idx = np.asarray(indices, dtype=np.int64)
        if not len(idx):
            continue
        r, c, h = risky[idx], caught[idx], hard[idx]
        reports.append(
            GroupReport(
                group=name,
                count=len(idx),
                allowed=float((route_arr[idx] == Route.ALLOW.value).mean()),
                escalated=float((route_arr[idx] == Route.ESCALATE.value).mean()),
                blocked=float((route_arr[idx] == Route.BLOCK.value).mean()),
                recall_risky=_rate(c[r]),
                escalation_benign=_rate(c[~r & ~h]),
                escalation_benign_hard=_rate(c[~r & h]),
                auroc=auroc(score_arr[idx], r),
            )
        )
    return reports


def report_by_file_and_category(
    rows: Sequence[LabelledText], routes: Sequence[Route], scores: Sequence[float]
) -> dict[str, list[GroupReport]]:
    """Reports under "file", "category" (each sorted by name) and "overall" (one report)."""
    by_file: dict[str, list[int]] = defaultdict(list)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_file[row.file].append(i)
        by_category[row.category].append(i)
    return {
        "file": report_groups(rows, routes, scores, sorted(by_file.items())),
        "category": report_groups(rows, routes, scores, sorted(by_category.items())),
        "overall": report_groups(rows, routes, scores, [("all", range(len(rows)))]),
    }
