"""Tier-1 cost per request, before and after a change to the router's rules or scorer.

Issue 12 asks that tier 1 cost no more per request after its changes. The
router's work per text is tier 0 (normalise, RE2 rules, detectors) and tier 1
(embed, search, score); a new detector or a refitted scorer changes only part
of it, so this measures both in one process, on the same texts, interleaved:

* "before": the prefilter rules and scoring model of `--before-rev` (read from
  git: router/patterns/*.yaml and router/scoring_model.json at that commit);
* "after": the working tree's.

Each profile (short support queries from banking77; mixed benign chat from
sharegpt and arena_hard) is routed `--rounds` times per side, alternating
sides and which goes first, in batches of `--batch` as the gateway's
micro-batcher sends them; it prints the median time per text of the whole
route and of the prefilter scan alone, and the after/before ratios.

    python benchmarks/tier1_cost.py [--before-rev 392e6e0] [--texts 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from _common import DEFAULT_DATA, DEFAULT_WORK_DIR, ROOT

from gateway.offline.evaluate import OfflineRouter
from gateway.runtime.config import load_config
from router.cross_source import Encode
from router.decision import Thresholds
from router.evaluation import read_labelled
from router.normalize import NormalizedText, normalize
from router.prefilter import Prefilter
from router.router import Router
from router.scoring import ScoringModel

PROFILES = {
    "short": ("banking77.jsonl",),
    "mixed": ("sharegpt_user_prompts.jsonl", "arena_hard.jsonl"),
}


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def _rules_at(rev: str, into: Path) -> Prefilter:
    """The prefilter of `rev`: its pattern packs written to `into`."""
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:router/patterns"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in names:
        (into / name).write_text(_git_show(rev, f"router/patterns/{name}"), encoding="utf-8")
    return Prefilter.from_directory(into)


def _texts(data: Path, files: Sequence[str], n: int) -> list[str]:
    rows = [r for name in files for r in read_labelled(data / name)]
    return [r.text for r in rows][:n]


def _ms_per_text(run: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / n * 1000.0


def _route_all(
    router: Router, texts: Sequence[str], thresholds: Thresholds, encode: Encode, batch: int
) -> None:
    for start in range(0, len(texts), batch):
        router.route_batch(texts[start : start + batch], thresholds=thresholds, encode=encode)


def _scan_all(prefilter: Prefilter, normalized: Sequence[NormalizedText]) -> None:
    for text in normalized:
        prefilter.scan(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-rev", default="392e6e0", help="the commit to compare against")
    parser.add_argument("--texts", type=int, default=400, help="texts per profile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    config = load_config(None, environ={}, overrides={
        "data_dir": str(args.work_dir / "tier1-cost"),
        "embedding.models_dir": str(args.work_dir / "models"),
    })  # fmt: skip
    prefilters = {"after": Prefilter.from_directory()}
    after = OfflineRouter.create(config, prefilter=prefilters["after"])  # shipped exemplars
    with tempfile.TemporaryDirectory() as tmp:
        scorer_path = Path(tmp) / "scoring_model.json"
        scorer_path.write_text(_git_show(args.before_rev, "router/scoring_model.json"))
        patterns = Path(tmp) / "patterns"
        patterns.mkdir()
        prefilters["before"] = _rules_at(args.before_rev, patterns)
        before = OfflineRouter.create(
            config, embedder=after.embedder, prefilter=prefilters["before"],
            scoring=ScoringModel.load(scorer_path),
        )  # fmt: skip
    sides = {"before": before, "after": after}
    thresholds = after.policy().thresholds
    encode = after.embedder.encode
    results: dict[str, dict[str, float]] = {}
    for profile, files in PROFILES.items():
        texts = _texts(args.data, files, args.texts)
        normalized = [normalize(t) for t in texts]
        route: dict[str, list[float]] = {side: [] for side in sides}
        scan: dict[str, list[float]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            order = list(sides.items()) if round_ % 2 == 0 else list(sides.items())[::-1]
            for side, offline in order:  # which side runs first alternates
                routed = partial(_route_all, offline.router, texts, thresholds, encode, args.batch)
                route[side].append(_ms_per_text(routed, len(texts)))
                scanned = partial(_scan_all, prefilters[side], normalized)
                scan[side].append(_ms_per_text(scanned, len(texts)))
        row = {
            f"{kind}_{side}_ms": statistics.median(values[side])
            for kind, values in (("route", route), ("scan", scan))
            for side in sides
        }
        row["route_ratio"] = row["route_after_ms"] / row["route_before_ms"]
        row["scan_ratio"] = row["scan_after_ms"] / row["scan_before_ms"]
        results[profile] = row
        print(
            f"{profile:6} ({len(texts)} texts, median of {args.rounds}): route "
            f"{row['route_before_ms']:.2f} -> {row['route_after_ms']:.2f} ms/text "
            f"(x{row['route_ratio']:.3f}); prefilter scan {row['scan_before_ms']:.3f} -> "
            f"{row['scan_after_ms']:.3f} ms/text (x{row['scan_ratio']:.3f})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
