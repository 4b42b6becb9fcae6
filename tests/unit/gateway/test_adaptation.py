"""The adaptation protocol (`gateway.offline.adaptation`) on an in-memory stand-in gateway.

The real gateway runs in tests/e2e/test_adaptation.py; here a fake with a toy
rule (a text is caught when it shares a word with a live risky exemplar, or
says "attack") checks the bookkeeping: what is scored, what is added and removed,
how rates pool, and that a gateway that does not come back is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.offline.adaptation import (
    AdaptationError,
    Added,
    Check,
    deal_families,
    format_adaptation,
    run_adaptation,
    sample_rows,
)
from router.cross_source import group_sources
from router.evaluation import LabelledText
from tests.unit.router.test_cross_source import corpus


class FakeGateway:
    """Caught = the text says "attack" or shares a word with a live added exemplar."""

    def __init__(self, *, leak: bool = False, fail_after_add: bool = False) -> None:
        self.version, self.live, self.next_id = 1, 100, 0
        self.added: dict[str, set[str]] = {}
        self.leak, self.fail_after_add = leak, fail_after_add
        self.removed: list[str] = []

    async def check(self, text: str) -> Check | None:
        if not text.strip():
            return None
        if self.fail_after_add and self.added:
            raise RuntimeError("the gateway went away")
        words = set(text.split())
        caught = "attack" in words or any(words & w for w in self.added.values())
        return Check(caught, self.version)

    async def add(self, rows: Sequence[LabelledText]) -> Added:
        ids = []
        for row in rows:
            self.next_id += 1
            ids.append(f"ex-{self.next_id}")
            self.added[ids[-1]] = set(row.text.split()) - {"please"}
        self.version += 1
        self.live += len(ids)
        return Added(tuple(ids), 0, self.version)

    async def remove(self, exemplar_ids: Sequence[str]) -> int:
        for exemplar_id in exemplar_ids:
            del self.added[exemplar_id]
            self.removed.append(exemplar_id)
            self.version += 1
            self.live -= 0 if self.leak else 1
        return self.version

    async def exemplar_count(self) -> tuple[int, int]:
        return self.version, self.live


def row(i: int, text: str, label: str, category: str, file: str) -> LabelledText:
    return LabelledText(f"{file}-{i}", text, label, category, "test", file)


def data() -> list[LabelledText]:
    """A family with a word of its own (zebra), one the fake already catches, benign chat."""
    rows = [row(i, f"please zebra{i % 3} item{i}", "risky", "injection", "zebra.jsonl")
            for i in range(9)]  # fmt: skip
    rows += [row(i, f"attack number {i}", "risky", "harmful", "attack.jsonl") for i in range(5)]
    rows += [row(i, f"please help with soup {i}", "benign", "benign", "chat.jsonl")
             for i in range(6)]  # fmt: skip
    rows += [row(i, f"kill a process {i}", "benign", "benign_hard", "chat.jsonl") for i in range(2)]
    return rows


async def test_each_family_is_scored_before_and_after_its_exemplars_then_restored() -> None:
    gateway = FakeGateway()
    lines: list[str] = []
    result = await run_adaptation(
        gateway, data(), k=3, groups=0, benign_sample=4, seed=1, progress=lines.append
    )
    assert [f.family for f in result.families] == ["attack", "zebra"]
    zebra = result.families[1]
    assert zebra.added == 3 and zebra.recall.n == 6
    assert zebra.recall.before == 0.0 and zebra.recall.after is not None
    assert zebra.recall.after > 0.0 and zebra.recall.points == 100 * zebra.recall.after
    assert set(gateway.removed) == {f"ex-{i}" for i in range(1, 7)} and not gateway.added
    assert result.benign_sampled == 4 and result.hard_sampled == 2
    assert zebra.benign.n == 4 and zebra.benign.before == 0.0 == zebra.benign.after
    assert zebra.restored_changed == 0 and zebra.versions[0] < zebra.versions[1] < zebra.versions[2]
    assert result.pooled["recall"].n == 2 + 6
    assert len(lines) == 4 and "index version" in lines[1]
    again = await run_adaptation(FakeGateway(), data(), k=3, groups=0, benign_sample=4, seed=1)
    assert [f.chosen_ids for f in again.families] == [f.chosen_ids for f in result.families]
    text = format_adaptation(result)
    assert "pooled" in text and "zebra" in text and "->" in text
    json.dumps(result.as_dict())


async def test_a_gateway_that_does_not_come_back_is_an_error() -> None:
    with pytest.raises(AdaptationError, match="exemplars after removing"):
        await run_adaptation(FakeGateway(leak=True), data(), k=3, groups=0)


async def test_the_added_exemplars_are_removed_even_when_scoring_fails() -> None:
    gateway = FakeGateway(fail_after_add=True)
    with pytest.raises(RuntimeError, match="went away"):
        await run_adaptation(gateway, data(), k=3, groups=0)
    assert gateway.removed and not gateway.added


async def test_k_must_leave_a_rest() -> None:
    with pytest.raises(ValueError, match="no family has more than 9"):
        await run_adaptation(FakeGateway(), data(), k=9, groups=0)


def test_groups_are_dealt_as_cross_source_deals_them() -> None:
    toy = corpus()
    for count in (2, 3):
        families, _ = deal_families(toy.rows, count, min_risky=1)
        dealt = group_sources(toy, count)
        assert {f: fam.name for fam in families for f in fam.files} == dealt
    families, skipped = deal_families(data(), 0, min_risky=6)
    assert [f.name for f in families] == ["zebra"] and skipped == ["attack: 5 risky rows (needs 6)"]
    with pytest.raises(ValueError, match="--groups"):
        deal_families(data(), 1, min_risky=1)


def test_samples_are_deterministic_and_keep_order() -> None:
    rows = data()
    first, second = sample_rows(rows, 5, "s"), sample_rows(rows, 5, "s")
    assert first == second and len(first) == 5
    assert [rows.index(r) for r in first] == sorted(rows.index(r) for r in first)
    assert sample_rows(rows, 0, "s") == rows == sample_rows(rows, 10_000, "s")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adaptation", "0"], "from 1 to 1000"),
        (["--adaptation", "5", "--cross-source"], "separate runs"),
        (["--adaptation", "5", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_bad_adaptation_flags_are_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--data", str(tmp_path / "x.jsonl"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_adaptation_never_starts_its_gateway_on_a_shared_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the child gateway reads the same config file: it would add and remove exemplars
    # in the fleet's database
    config = tmp_path / "fleet.yaml"
    config.write_text("store: {url: 'postgresql://tierguard@db.internal/tierguard'}\n")
    data = tmp_path / "x.jsonl"
    data.write_text('{"text": "t", "label": "risky", "category": "harmful"}\n' * 30)
    argv = ["eval", "--adaptation", "5", "--groups", "0", "--data", str(data)]
    assert main([*argv, "--config", str(config)]) == 2
    assert "store.url would point it at a shared database" in capsys.readouterr().err
    assert main([*argv, "--store-url", "postgresql://tierguard@db.internal/tierguard"]) == 2
    assert "--store-url does not apply" in capsys.readouterr().err
