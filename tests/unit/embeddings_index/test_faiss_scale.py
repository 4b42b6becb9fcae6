"""Exact or approximate by size, live changes on an approximate index, snapshots.

Small on purpose: `approximate_above=2000` and 5,000 clustered unit vectors
make the approximate paths run in seconds. Speed is measured in
`benchmarks/index_scale.py`, never asserted here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from embeddings_index.embedder import SentenceTransformerEmbedder
from embeddings_index.faiss_index import ExemplarIndex, IndexOptions
from embeddings_index.manager import IndexManager
from embeddings_index.snapshot import MANIFEST, load_snapshot, save_snapshot
from embeddings_index.store import Exemplar

DIM, N, K = 384, 5_000, 10
SMALL = IndexOptions(approximate_above=2_000)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """5,000 vectors in 200 clusters (paraphrase-like), and 200 queries near them."""
    rng = np.random.default_rng(7)
    centres = unit(rng.standard_normal((200, DIM)))
    vectors = unit(centres[rng.integers(200, size=N)] + 0.06 * rng.standard_normal((N, DIM)))
    queries = unit(centres[rng.integers(200, size=200)] + 0.06 * rng.standard_normal((200, DIM)))
    return vectors, queries


def make(vectors: np.ndarray, options: IndexOptions, version: int = 1) -> ExemplarIndex:
    n = len(vectors)
    return ExemplarIndex(version=version, model_id="m", ids=[f"e{i}" for i in range(n)],
                         labels=["risky" if i % 3 == 0 else "benign" for i in range(n)],
                         categories=[f"c{i % 5}" for i in range(n)], vectors=vectors,
                         options=options)  # fmt: skip


def ids_of(index: ExemplarIndex, queries: np.ndarray, k: int = K) -> list[list[str]]:
    return [[index.ids[p] for p in found.positions] for found in index.search(queries, k)]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


@pytest.fixture(scope="module")
def exact(data: tuple[np.ndarray, np.ndarray]) -> ExemplarIndex:
    return make(data[0], IndexOptions(approximate_above=N))


@pytest.fixture(scope="module")
def approximate(data: tuple[np.ndarray, np.ndarray]) -> ExemplarIndex:
    return make(data[0], SMALL)


def test_structure_follows_the_size(
    exact: ExemplarIndex, approximate: ExemplarIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    assert (exact.structure, exact.approximate) == ("flat", False)
    assert (approximate.structure, approximate.approximate) == ("ivf_flat", True)
    assert make(data[0][:2_000], SMALL).structure == "flat"  # at the limit: still exact
    assert len(approximate) == N and approximate.dim == DIM


@pytest.mark.parametrize("structure", ["ivf_flat", "ivf_sq8", "hnsw"])
def test_approximate_recall_against_exact(
    structure: str, exact: ExemplarIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = data
    index = make(vectors, dataclasses.replace(SMALL, structure=structure))
    assert index.structure == structure
    assert recall(ids_of(index, queries), ids_of(exact, queries)) >= 0.9
    [one] = index.search(queries[:1], K)  # the public shape is unchanged
    assert len(one.positions) == K and list(one.risky) == [index.risky[p] for p in one.positions]
    assert np.all(np.diff(one.similarities) <= 1e-6)


def test_deletions_take_effect_at_once_and_k_stays_full(
    approximate: ExemplarIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    queries = data[1][:50]
    before = ids_of(approximate, queries)
    removed = sorted({eid for row in before for eid in row[:3]})
    after = approximate.with_changes(version=2, removed_ids=removed)
    found = ids_of(after, queries)
    assert not set(removed) & {eid for row in found for eid in row}
    assert all(len(row) == K for row in found)
    assert len(after) == N - len(removed)
    assert ids_of(approximate, queries) == before  # the old snapshot is untouched
    assert after.state.base is approximate.state.base  # no rebuild, no copy


def test_additions_are_searched_beside_the_base_then_removable(
    approximate: ExemplarIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    query = data[1][:1]
    added = approximate.with_changes(
        version=2, ids=["new"], labels=["risky"], categories=["fresh"], vectors=query
    )
    [hit] = added.search(query, K)
    assert added.ids[hit.positions[0]] == "new" and hit.similarities[0] == pytest.approx(1.0)
    assert added.label(int(hit.positions[0])) == "risky"
    assert added.categories[hit.positions[0]] == "fresh"
    assert added.delta_size == 1 and len(added) == N + 1
    gone = added.with_changes(version=3, removed_ids=["new"])
    assert "new" not in ids_of(gone, query)[0] and gone.delta_size == 0


def test_exact_index_honours_removals_too(exact: ExemplarIndex, data: tuple) -> None:
    query = data[1][:1]
    top = ids_of(exact, query)[0]
    after = exact.with_changes(version=2, removed_ids=top[:2])
    remaining = ids_of(after, query)[0]
    assert remaining[: len(top) - 2] == top[2:] and not set(top[:2]) & set(remaining)


def test_snapshot_round_trips(
    approximate: ExemplarIndex, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    queries = data[1]
    changed = approximate.with_changes(
        version=2, ids=["new"], labels=["risky"], categories=["fresh"], vectors=queries[:1],
        removed_ids=["e1", "e2", "e3"],
    )  # fmt: skip
    save_snapshot(tmp_path, changed)
    loaded = load_snapshot(tmp_path, version=2, model_id="m", options=SMALL)
    assert loaded is not None
    assert (loaded.structure, loaded.version, len(loaded)) == ("ivf_flat", 2, len(changed))
    assert loaded.ids == changed.ids and loaded.categories == changed.categories
    assert np.array_equal(loaded.risky, changed.risky)
    for mine, theirs in zip(loaded.search(queries, K), changed.search(queries, K), strict=True):
        assert np.array_equal(mine.positions, theirs.positions)
        assert np.allclose(mine.similarities, theirs.similarities)


def test_a_stale_or_damaged_snapshot_is_not_loaded(
    approximate: ExemplarIndex, tmp_path: Path
) -> None:
    save_snapshot(tmp_path, approximate)
    assert load_snapshot(tmp_path, version=1, model_id="m", options=SMALL) is not None
    assert load_snapshot(tmp_path, version=2, model_id="m", options=SMALL) is None
    assert load_snapshot(tmp_path, version=1, model_id="other", options=SMALL) is None
    other_build = dataclasses.replace(SMALL, nlist=64)
    assert load_snapshot(tmp_path, version=1, model_id="m", options=other_build) is None
    searched_differently = dataclasses.replace(SMALL, nprobe=4)  # a search knob: still loads
    assert load_snapshot(tmp_path, version=1, model_id="m", options=searched_differently)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / f"{manifest['base']}.faiss").write_bytes(b"not an index")
    assert load_snapshot(tmp_path, version=1, model_id="m", options=SMALL) is None
    assert load_snapshot(tmp_path / "missing", version=1, model_id="m") is None


def exemplars(n: int, prefix: str) -> list[Exemplar]:
    return [Exemplar(id=f"{prefix}{i}", text=f"{prefix} text {i}", label="risky" if i % 2 else "benign",
                     category="c", source="test") for i in range(n)]  # fmt: skip


def test_manager_changes_a_big_index_in_place_and_restarts_from_its_snapshot(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = data
    snapshots = tmp_path / "index"
    open_ = lambda: IndexManager.open(  # noqa: E731
        tmp_path, embedder, starter_dir=None, index_options=SMALL, snapshot_dir=snapshots
    )
    manager = open_()
    manager.add(exemplars(N, "e"), vectors)
    built = manager.index
    assert built.structure == "ivf_flat" and built.delta_size == 0
    manager.add(exemplars(1, "late"), queries[:1])
    manager.delete("e0")
    assert manager.index.state.base is built.state.base  # neither change retrained
    assert manager.index.delta_size == 1 and len(manager.index) == N
    [hit] = manager.index.search(queries[:1], 1)
    assert manager.index.ids[hit.positions[0]] == "late0"
    assert "e0" not in ids_of(manager.index, vectors[:1])[0]
    expected = ids_of(manager.index, queries)
    manager.store.close()

    reopened = open_()  # same version and model: the snapshot, not a rebuild
    assert reopened.index.state.base_token == built.state.base_token
    assert reopened.index.version == manager.index.version
    assert ids_of(reopened.index, queries) == expected

    reopened.store.delete("e5")  # the store moves on without the index
    reopened.store.close()
    rebuilt = open_()
    assert rebuilt.index.state.base_token != built.state.base_token
    assert rebuilt.index.delta_size == 0 and len(rebuilt.index) == N - 1
    assert "e5" not in rebuilt.index.ids and "late0" in rebuilt.index.ids
    rebuilt.store.close()


def test_manager_without_snapshot_dir_writes_no_snapshot(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, _ = data
    before = set(tmp_path.iterdir())
    manager = IndexManager.open(tmp_path, embedder, starter_dir=None, index_options=SMALL)
    manager.add(exemplars(N, "e"), vectors)  # approximate now: with a directory it would save
    assert manager.snapshot_dir is None and manager.index.structure == "ivf_flat"
    manager.store.close()
    written = {p for p in tmp_path.rglob("*") if p not in before}
    assert written and all(p.name.startswith("exemplars.sqlite") for p in written)


def test_removals_count_towards_the_rebuild_bound(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, _ = data
    options = dataclasses.replace(SMALL, max_delta=2)
    manager = IndexManager.open(tmp_path, embedder, starter_dir=None, index_options=options)
    manager.add(exemplars(N, "e"), vectors)
    built = manager.index
    manager.delete("e0")
    manager.delete("e1")
    assert manager.index.state.base is built.state.base  # within the bound: on the side
    assert manager.index.changes_since_build == 2
    manager.delete("e2")  # past it: a rebuild drops the dead entries
    assert manager.index.state.base is not built.state.base
    assert manager.index.changes_since_build == 0 and len(manager.index) == N - 3
    assert not {"e0", "e1", "e2"} & {i for row in ids_of(manager.index, vectors[:3]) for i in row}
    manager.store.close()
