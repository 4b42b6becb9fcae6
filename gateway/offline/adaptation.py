"""`tierguard eval --adaptation K`: do the exemplars an admin adds catch the rest of a family?

Exemplars exist so that an admin who files an incident sees its family caught and
nothing else change. For each family of risky prompts (a group of source files,
dealt as `--cross-source --groups` deals them, or one file), on a live gateway:

1. score the family's risky rows and a fixed sample of the ordinary and hard
   benign rows of the other files (the shipped state);
2. add K of the family's risky rows through the admin API, wait until verdicts
   report the new index version, and score the same rows again; the K added rows
   themselves are left out of the family's recall ("the rest");
3. remove what was added, wait for that version, check that the live exemplar
   count is back and that the same rows are decided as in step 1.

"Caught" is a decision other than ALLOW (escalated or blocked), as in
`benchmarks/conversation_eval.py` and `router.evaluation`. This module is the
protocol and the report; it reaches the gateway through `LiveGateway`, which
the CLI implements over gRPC (`gateway/cli/adaptation.py`), because the
offline tools never speak gRPC themselves.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from embeddings_index.store import text_key
from router.cross_source import deal_sources
from router.evaluation import LabelledText

__all__ = [
    "AdaptationError",
    "AdaptationResult",
    "Added",
    "Check",
    "Family",
    "FamilyReport",
    "LiveGateway",
    "Rate",
    "deal_families",
    "format_adaptation",
    "run_adaptation",
    "sample_rows",
]

# What issue 12 asks of K = 20: the family's other risky prompts caught at this rate ...
TARGET_RECALL = 0.85
# ... while ordinary benign escalation rises by at most this many percentage points.
TARGET_BENIGN_POINTS = 0.3


class AdaptationError(RuntimeError):
    """The gateway did not return to the state a family started from."""


@dataclass(frozen=True)
class Check:
    """One verdict, reduced to what adaptation needs."""

    caught: bool
    index_version: int


@dataclass(frozen=True)
class Added:
    """The outcome of one AddExemplars batch.

    Attributes:
        exemplar_ids: The exemplars the call created (only these are removed later).
        duplicates: Rows reported as duplicates or near-duplicates of live
            exemplars, so not added.
        index_version: The index version after the change.
    """

    exemplar_ids: tuple[str, ...]
    duplicates: int
    index_version: int


class LiveGateway(Protocol):
    """The calls adaptation makes on a running gateway (implemented over gRPC by the CLI)."""

    async def check(self, text: str) -> Check | None:
        """CheckPrompt; None when the gateway refuses the text (INVALID_ARGUMENT)."""
        ...

    async def add(self, rows: Sequence[LabelledText]) -> Added:
        """AddExemplars of `rows` as risky exemplars."""
        ...

    async def remove(self, exemplar_ids: Sequence[str]) -> int:
        """Remove the exemplars; the index version after the last removal."""
        ...

    async def exemplar_count(self) -> tuple[int, int]:
        """(index version, live exemplars) from the gateway's statistics."""
        ...


@dataclass(frozen=True)
class Family:
    """Risky rows an admin would add exemplars for, and the files they come from."""

    name: str
    files: tuple[str, ...]
    risky: tuple[LabelledText, ...]


def deal_families(
    rows: Sequence[LabelledText], groups: int, *, min_risky: int
) -> tuple[list[Family], list[str]]:
    """Families of `rows`, and notes on the units left out for too few risky rows.

    `groups` >= 2 deals the files into that many groups as `eval --cross-source
    --groups` does (`router.cross_source.deal_sources`), so "group 3" names the
    same files in both reports; 0 makes each file with risky rows its own family.
    """
    files = sorted({r.file for r in rows})
    with_risky = {r.file for r in rows if r.label == "risky"}
    if groups == 0:
        unit_of = {f: f.removesuffix(".jsonl") for f in sorted(with_risky)}
    elif groups >= 2:
        unit_of = deal_sources(files, with_risky, groups)
    else:
        raise ValueError("--groups: 0 (one family per file) or at least 2")
    families, skipped = [], []
    for unit in sorted(set(unit_of.values()), key=_natural):
        members = tuple(f for f in files if unit_of.get(f) == unit)
        risky = tuple(r for r in rows if r.label == "risky" and unit_of.get(r.file) == unit)
        if len(risky) < min_risky:
            skipped.append(f"{unit}: {len(risky)} risky rows (needs {min_risky})")
        else:
            families.append(Family(unit, members, risky))
    return families, skipped


def _natural(name: str) -> tuple[str, int]:
    """Sort key: "group 10" after "group 9"."""
    head, _, tail = name.rpartition(" ")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def sample_rows(rows: Sequence[LabelledText], n: int, seed: str) -> list[LabelledText]:
    """A deterministic sample of `n` rows in their original order (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


@dataclass(frozen=True)
class Rate:
    """Caught (or escalated) among the rows the gateway answered."""

    n: int
    before: float | None
    after: float | None

    @property
    def points(self) -> float | None:
        """after - before, in percentage points."""
        if self.before is None or self.after is None:
            return None
        return 100.0 * (self.after - self.before)


@dataclass(frozen=True)
class FamilyReport:
    """One family: recall of its other risky rows and benign escalation, before and after.

    Attributes:
        family: The family's name ("group 2", or a file's stem).
        files: Its source files.
        risky: Its risky rows.
        chosen_ids: Dataset ids of the K rows sent to AddExemplars.
        added: How many of them the gateway added.
        duplicates: How many it reported as (near-)duplicates of live exemplars.
        recall: The family's other risky rows caught.
        benign: Ordinary benign rows of the other files escalated.
        hard: `benign_hard` rows of the other files escalated.
        versions: The index version verdicts reported before, after the add and
            after the removal.
        restored_changed: Rows decided differently after the removal than before
            the add (0 when the gateway is back where it was).
        refused: Rows the gateway refused (not counted in any rate).
        seconds: Wall time for the family.
    """

    family: str
    files: tuple[str, ...]
    risky: int
    chosen_ids: tuple[str, ...]
    added: int
    duplicates: int
    recall: Rate
    benign: Rate
    hard: Rate
    versions: tuple[int, int, int]
    restored_changed: int
    refused: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, with each rate's change in points."""
        out = asdict(self)
        for name in ("recall", "benign", "hard"):
            out[name]["points"] = getattr(self, name).points
        return out


@dataclass(frozen=True)
class AdaptationResult:
    """Every family's report, pooled figures and how the run was made."""

    k: int
    groups: int
    seed: int
    where: str
    benign_pool: int
    hard_pool: int
    benign_sampled: int
    hard_sampled: int
    families: list[FamilyReport]
    skipped: list[str]
    exemplars: int
    seconds: float
    pooled: dict[str, Rate] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "k": self.k, "groups": self.groups, "seed": self.seed, "gateway": self.where,
            "benign_pool": self.benign_pool, "hard_pool": self.hard_pool,
            "benign_sampled": self.benign_sampled, "hard_sampled": self.hard_sampled,
            "exemplars": self.exemplars, "seconds": round(self.seconds, 1),
            "skipped": self.skipped, "families": [f.as_dict() for f in self.families],
            "pooled": {k: {**asdict(v), "points": v.points} for k, v in self.pooled.items()},
            "target": {"recall": TARGET_RECALL, "benign_points": TARGET_BENIGN_POINTS},
        }  # fmt: skip


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


_Pairs = list[tuple[bool, bool]]


def _pairs(span: range, before: Sequence[Check | None], after: Sequence[Check | None]) -> _Pairs:
    """(caught before, caught after) of the rows in `span` that both passes answered."""
    return [
        (b.caught, a.caught)
        for b, a in ((before[i], after[i]) for i in span)
        if b is not None and a is not None
    ]


def _rate(pairs: _Pairs) -> Rate:
    return Rate(len(pairs), _share([b for b, _ in pairs]), _share([a for _, a in pairs]))


async def _score(gateway: LiveGateway, rows: Sequence[LabelledText]) -> list[Check | None]:
    """Every row through CheckPrompt, concurrently (the gateway client bounds calls in flight)."""
    return list(await asyncio.gather(*(gateway.check(r.text) for r in rows)))


async def _wait_for_version(
    gateway: LiveGateway, probe: str, version: int, timeout_s: float = 120.0
) -> int:
    """Block until verdicts report `version` or later: the change is what requests see."""
    deadline = time.monotonic() + timeout_s
    while True:
        check = await gateway.check(probe)
        if check is not None and check.index_version >= version:
            return check.index_version
        if time.monotonic() > deadline:
            seen = check.index_version if check else "none"
            raise AdaptationError(f"verdicts still report index version {seen}, not {version}")
        await asyncio.sleep(0.05)


def _version(checks: Sequence[Check | None]) -> int:
    return max((c.index_version for c in checks if c is not None), default=-1)


async def run_adaptation(
    gateway: LiveGateway,
    rows: Sequence[LabelledText],
    *,
    k: int,
    groups: int = 5,
    benign_sample: int = 3000,
    seed: int = 0,
    where: str = "",
    progress: Callable[[str], None] | None = None,
) -> AdaptationResult:
    """Adaptation of every family of `rows` on `gateway`; see the module docstring.

    Raises:
        ValueError: k < 1, or no family has more than k risky rows.
        AdaptationError: the gateway did not return to its starting state.
    """
    if k < 1:
        raise ValueError("--adaptation: K must be at least 1")
    say = progress or (lambda _: None)
    started = time.monotonic()
    families, skipped = deal_families(rows, groups, min_risky=k + 1)
    if not families:
        raise ValueError(f"no family has more than {k} risky rows: {'; '.join(skipped)}")
    pool = [r for r in rows if r.label == "benign" and r.category != "benign_hard"]
    hard_pool = [r for r in rows if r.label == "benign" and r.category == "benign_hard"]
    benign = sample_rows(pool, benign_sample, f"{seed}:benign")
    hard = sample_rows(hard_pool, benign_sample, f"{seed}:benign_hard")
    _, exemplars = await gateway.exemplar_count()
    reports: list[FamilyReport] = []
    parts: list[list[_Pairs]] = []
    for number, family in enumerate(families, start=1):
        t0 = time.monotonic()
        chosen = random.Random(f"{seed}:{family.name}").sample(family.risky, k)
        # texts equal up to case and spacing count as one, as the store's duplicate check
        keys = {text_key(r.text) for r in chosen}
        rest = [r for r in family.risky if text_key(r.text) not in keys]
        outside = [r for r in benign if r.file not in family.files]
        outside_hard = [r for r in hard if r.file not in family.files]
        scored = [*rest, *outside, *outside_hard]
        spans = (
            range(len(rest)),
            range(len(rest), len(rest) + len(outside)),
            range(len(rest) + len(outside), len(scored)),
        )
        version, count = await gateway.exemplar_count()
        say(f"[{number}/{len(families)}] {family.name} ({', '.join(family.files)}): "
            f"{len(rest)} risky + {len(outside)} benign + {len(outside_hard)} hard, "
            f"index version {version}, {count} exemplars")  # fmt: skip
        before = await _score(gateway, scored)
        added = await gateway.add(chosen)
        try:
            after_version = await _wait_for_version(gateway, chosen[0].text, added.index_version)
            after = await _score(gateway, scored)
        finally:  # never leave a family's exemplars behind, whatever failed
            ids = added.exemplar_ids
            removed_version = await gateway.remove(ids) if ids else added.index_version
        restored_version = await _wait_for_version(gateway, chosen[0].text, removed_version)
        restored = await _score(gateway, scored)
        version_now, count_now = await gateway.exemplar_count()
        if count_now != count:
            raise AdaptationError(
                f"{family.name}: the gateway has {count_now} exemplars after removing the "
                f"{len(added.exemplar_ids)} added, not {count} (index version {version_now})"
            )
        pairs = [_pairs(span, before, after) for span in spans]
        parts.append(pairs)
        rates = [_rate(p) for p in pairs]
        changed = sum(
            1 for b, r in zip(before, restored, strict=True)
            if b is not None and r is not None and b.caught != r.caught
        )  # fmt: skip
        report = FamilyReport(
            family=family.name, files=family.files, risky=len(family.risky),
            chosen_ids=tuple(r.id for r in chosen), added=len(added.exemplar_ids),
            duplicates=added.duplicates, recall=rates[0], benign=rates[1], hard=rates[2],
            versions=(_version(before), max(after_version, _version(after)),
                      max(restored_version, _version(restored))),
            restored_changed=changed,
            refused=sum(1 for c in before if c is None),
            seconds=time.monotonic() - t0,
        )  # fmt: skip
        reports.append(report)
        v = report.versions
        say(f"[{number}/{len(families)}] {family.name}: recall {_f(report.recall.before)} -> "
            f"{_f(report.recall.after)}, benign {_pct(report.benign.before)} -> "
            f"{_pct(report.benign.after)}; index version {v[0]} -> {v[1]} -> {v[2]}, "
            f"{count_now} exemplars, {changed} decisions differ after removal "
            f"({report.seconds:.0f} s)")  # fmt: skip
    pooled = {
        name: _rate([pair for family in parts for pair in family[i]])
        for i, name in enumerate(("recall", "benign", "hard"))
    }
    return AdaptationResult(
        k=k, groups=groups, seed=seed, where=where, benign_pool=len(pool),
        hard_pool=len(hard_pool), benign_sampled=len(benign), hard_sampled=len(hard),
        families=reports, skipped=skipped, exemplars=exemplars,
        seconds=time.monotonic() - started, pooled=pooled,
    )  # fmt: skip


def _f(value: float | None, width: int = 0) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def _pct(value: float | None, width: int = 0) -> str:
    return f"{100 * value:>{width - 1}.2f}%" if value is not None else f"{'-':>{width}}"


def _pts(value: float | None, width: int) -> str:
    return f"{value:>+{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_adaptation(result: AdaptationResult) -> str:
    """The result as an aligned text table, pooled last, then the target and the groups' files."""
    unit = f"{result.groups} groups of source files" if result.groups else "one file each"
    lines = [
        f"adaptation: K = {result.k} risky exemplars per family ({unit}) added through the "
        f"admin API of {result.where or 'a live gateway'} and removed again; seed {result.seed}",
        f"benign rows of the files outside each family: {result.benign_sampled} of "
        f"{result.benign_pool} ordinary, {result.hard_sampled} of {result.hard_pool} hard; "
        f"caught / escalated = decision not ALLOW",
        "",
    ]
    header = (
        f"{'family':<28} {'risky':>6} {'added':>5} {'dup':>3} {'rest':>6} {'recall':>7} "
        f"{'after':>6} {'+pts':>7}  {'benign':>6} {'before':>7} {'after':>7} {'+pts':>6}  "
        f"{'hard':>5} {'before':>7} {'after':>7} {'+pts':>6}  {'index version':>17} {'diff':>4}"
    )
    lines += [header, "-" * len(header)]
    for r in result.families:
        versions = f"{r.versions[0]}->{r.versions[1]}->{r.versions[2]}"
        lines.append(
            f"{r.family[:28]:<28} {r.risky:>6} {r.added:>5} {r.duplicates:>3} {r.recall.n:>6} "
            f"{_f(r.recall.before, 7)} {_f(r.recall.after, 6)} {_pts(r.recall.points, 7)}  "
            f"{r.benign.n:>6} {_pct(r.benign.before, 7)} {_pct(r.benign.after, 7)} "
            f"{_pts(r.benign.points, 6)}  {r.hard.n:>5} {_pct(r.hard.before, 7)} "
            f"{_pct(r.hard.after, 7)} {_pts(r.hard.points, 6)}  {versions:>17} "
            f"{r.restored_changed:>4}"
        )
    p = result.pooled
    if p:
        lines.append("-" * len(header))
        added = sum(r.added for r in result.families)
        lines.append(
            f"{'pooled':<28} {sum(r.risky for r in result.families):>6} {added:>5} "
            f"{sum(r.duplicates for r in result.families):>3} {p['recall'].n:>6} "
            f"{_f(p['recall'].before, 7)} {_f(p['recall'].after, 6)} {_pts(p['recall'].points, 7)}  "
            f"{p['benign'].n:>6} {_pct(p['benign'].before, 7)} {_pct(p['benign'].after, 7)} "
            f"{_pts(p['benign'].points, 6)}  {p['hard'].n:>5} {_pct(p['hard'].before, 7)} "
            f"{_pct(p['hard'].after, 7)} {_pts(p['hard'].points, 6)}"
        )
    lines += [
        "",
        "recall: the family's risky rows other than the K added, caught before and after the "
        "add; benign / hard: escalation of the other files' ordinary / hard benign rows",
        "index version: as verdicts report it before, after the add, after the removal; diff: "
        "rows decided differently after the removal than before the add",
    ]
    if p and p["recall"].after is not None and p["benign"].points is not None:
        worst = min(
            result.families, key=lambda r: r.recall.after if r.recall.after is not None else 1.0
        )
        met = p["recall"].after >= TARGET_RECALL and p["benign"].points <= TARGET_BENIGN_POINTS
        lines.append(
            f"target (issue 12, set for K = 20): rest caught >= {TARGET_RECALL}, ordinary benign up <= "
            f"{TARGET_BENIGN_POINTS} points: pooled {_f(p['recall'].after)} and "
            f"{_pts(p['benign'].points, 0)} points: {'met' if met else 'NOT met'}; worst family "
            f"{worst.family} {_f(worst.recall.after)}"
        )
    refused = sum(r.refused for r in result.families)
    if refused:
        lines.append(f"rows the gateway refused (left out of every rate): {refused}")
    if result.groups:
        lines.append("")
        lines += [f"{r.family}: {', '.join(f.removesuffix('.jsonl') for f in r.files)}"
                  for r in result.families]  # fmt: skip
    lines += [f"skipped {s}" for s in result.skipped]
    lines.append(f"\n{len(result.families)} families in {result.seconds:.0f} s")
    return "\n".join(lines)
