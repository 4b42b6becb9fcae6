"""The exemplar store on SQLite and on PostgreSQL: durability, versions, soft deletion, paging.

Every test runs on both engines (the `storage` fixture of tests/conftest.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import psycopg
import pytest

from embeddings_index.database import DatabaseError, SQLiteDatabase, Storage
from embeddings_index.store import (
    _MIGRATIONS,
    INDEX_CHANNEL,
    Exemplar,
    ExemplarStore,
    StoreError,
    text_key,
)

T = TypeVar("T")


def ex(
    eid: str, text: str = "", label: str = "risky", category: str = "prompt_injection"
) -> Exemplar:
    return Exemplar(id=eid, text=text or f"text of {eid}", label=label, category=category,
                    source="test", added_by="tester")  # fmt: skip


def vectors(n: int, dim: int = 4) -> np.ndarray:
    rng = np.random.default_rng(n)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(storage: Storage) -> Iterator[ExemplarStore]:
    opened = ExemplarStore(storage.open("exemplars"))
    yield opened
    opened.close()


def test_every_change_bumps_the_version(store: ExemplarStore) -> None:
    assert store.version == 0
    assert store.add([ex("a"), ex("b")], vectors(2), embedding_model="m") == 1
    assert store.delete("a") == 2
    assert store.delete("a") is None  # not live any more: no change, no new version
    assert store.version == 2
    assert store.count() == 1


def test_writes_survive_reopening(storage: Storage) -> None:
    first = ExemplarStore(storage.open("exemplars"))
    v = vectors(2)
    first.add([ex("a"), ex("b", label="benign", category="benign")], v, embedding_model="m")
    first.delete("b")
    # no close(): an acknowledged write must already be committed, seen by another connection
    reopened = Storage(storage.url, storage.data_dir)
    second = ExemplarStore(reopened.open("exemplars"))
    exemplars, matrix, missing = second.live_vectors("m")
    assert [e.id for e in exemplars] == ["a"] and missing == []
    np.testing.assert_array_equal(matrix[0], v[0])
    assert second.version == 2
    second.close()
    first.close()


def test_duplicate_id_is_rejected_and_nothing_is_written(store: ExemplarStore) -> None:
    store.add([ex("a")], vectors(1), embedding_model="m")
    with pytest.raises(StoreError, match="cannot add"):
        store.add([ex("b"), ex("a")], vectors(2), embedding_model="m")
    assert store.count() == 1 and store.version == 1


def test_unknown_label_is_rejected(store: ExemplarStore) -> None:
    with pytest.raises(StoreError, match="label"):
        store.add([ex("a", label="spicy")], vectors(1), embedding_model="m")


def test_vectors_of_another_model_are_reported_missing(store: ExemplarStore) -> None:
    store.add([ex("a"), ex("b")], vectors(2), embedding_model="old")
    store.delete("b")
    have, _, missing = store.live_vectors("new")
    assert have == [] and [e.id for e in missing] == ["a"]
    assert store.lacking_vectors("new") == missing
    assert store.lacking_vectors("old") == []
    store.set_embeddings(["a"], vectors(1), embedding_model="new")
    have, _, missing = store.live_vectors("new")
    assert [e.id for e in have] == ["a"] and missing == []
    assert store.lacking_vectors("new") == []


def test_list_filters_and_pages(store: ExemplarStore) -> None:
    items = [ex(f"r{i}") for i in range(5)] + [
        ex(f"b{i}", label="benign", category="benign") for i in range(3)
    ]
    store.add(items, vectors(8), embedding_model="m")
    first = store.list(label="risky", limit=3)
    second = store.list(label="risky", after_row_id=first[-1].row_id, limit=3)
    assert [e.id for e in first + second] == [f"r{i}" for i in range(5)]
    assert [e.id for e in store.list(category="benign")] == ["b0", "b1", "b2"]
    assert store.counts() == {("risky", "prompt_injection"): 5, ("benign", "benign"): 3}
    assert store.known_ids() == {e.id for e in items}


def test_find_by_text_folds_case_and_spacing(store: ExemplarStore) -> None:
    store.add([ex("a", text="Ignore  the RULES")], vectors(1), embedding_model="m")
    found = store.find_by_text(["ignore the rules", "something else"])
    assert [e.id for e in found.values()] == ["a"]
    assert text_key("Ignore  the RULES") == text_key("ignore the rules")


def proposal(text: str) -> Exemplar:
    return Exemplar(id="", text=text, label="risky", category="prompt_injection",
                    source="critic:test", added_by="critic")  # fmt: skip


def test_pending_proposals_page_by_id_without_repeats_or_gaps(store: ExemplarStore) -> None:
    for i in range(7):
        assert store.propose(proposal(f"proposal {i}"))
    first = store.pending_proposals(limit=3)
    store.review_proposal(first[1][0], accept=False, reviewer="tester")  # reviewed mid-listing
    second = store.pending_proposals(after_id=first[-1][0], limit=3)
    third = store.pending_proposals(after_id=second[-1][0], limit=3)
    texts = [e.text for _, e in first + second + third]
    assert texts == [f"proposal {i}" for i in range(7)]
    assert len(third) == 1
    assert [e.text for _, e in store.pending_proposals()] == [
        f"proposal {i}" for i in range(7) if i != 1
    ]


def test_pending_proposals_are_counted_in_the_database(store: ExemplarStore) -> None:
    assert store.count_pending_proposals() == 0
    for i in range(4):
        store.propose(proposal(f"proposal {i}"))
    assert not store.propose(proposal("PROPOSAL 0"))  # already queued: not counted twice
    [(pid, _)] = store.pending_proposals(limit=1)
    store.review_proposal(pid, accept=True, reviewer="tester")
    assert store.count_pending_proposals() == 3 == len(store.pending_proposals())


def test_rollback_restores_an_earlier_set_as_a_new_version(store: ExemplarStore) -> None:
    store.add([ex("a"), ex("b")], vectors(2), embedding_model="m")  # 1
    store.delete("a")  # 2
    store.add([ex("c")], vectors(1), embedding_model="m")  # 3
    assert store.rollback(1) == (4, 1, 1)  # c out, a back
    assert {e.id for e in store.list_all()} == {"a", "b"}
    with pytest.raises(StoreError, match="earlier version"):
        store.rollback(4)
    assert store.version == 4  # a refused rollback takes no version


def test_changes_since_a_version(store: ExemplarStore) -> None:
    v = vectors(3)
    store.add([ex("a"), ex("b")], v[:2], embedding_model="m")  # 1
    store.add([ex("c")], v[2:], embedding_model="other")  # 2
    store.delete("a")  # 3
    changes = store.changes_since(1, "m")
    assert changes.version == 3 and changes.removed == ["a"]
    assert changes.added == [] and [e.id for e in changes.missing] == ["c"]
    everything = store.changes_since(0, "m")
    assert [e.id for e in everything.added] == ["b"] and everything.removed == ["a"]
    np.testing.assert_array_equal(everything.vectors[0], v[1])
    assert store.changes_since(3, "m").added == [] == store.changes_since(3, "m").removed
    with pytest.raises(StoreError, match="not one of this store's"):
        store.changes_since(4, "m")


def test_adding_what_exists_can_be_skipped_without_a_new_version(store: ExemplarStore) -> None:
    store.add([ex("a")], vectors(1), embedding_model="m")
    assert store.add([ex("a")], vectors(1), embedding_model="m", skip_existing=True) == 1
    assert store.add([ex("a"), ex("b")], vectors(2), embedding_model="m", skip_existing=True) == 2
    assert store.known_ids() == {"a", "b"} and store.version == 2


def test_a_pending_proposal_is_reviewed_once(store: ExemplarStore) -> None:
    store.propose(proposal("review me"))
    [(pid, _)] = store.pending_proposals()
    store.review_proposal(pid, accept=False, reviewer="tester")
    with pytest.raises(StoreError, match="no pending proposal"):
        store.review_proposal(pid, accept=True, reviewer="tester")


def in_threads(n: int, work: Callable[[int], T]) -> list[T]:
    """`work(i)` for i in range(n), in n threads released at once; re-raises the first error."""
    barrier = threading.Barrier(n)
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return [results[i] for i in range(n)]


def test_two_writers_in_separate_processes_never_share_a_version(storage: Storage) -> None:
    # Each writer has its own Storage: its own connections, as another process would.
    places = [Storage(storage.url, storage.data_dir) for _ in range(2)]
    stores = [ExemplarStore(place.open("exemplars")) for place in places]

    def write(i: int) -> list[int]:
        return [
            stores[i].add([ex(f"w{i}-{n}")], vectors(1), embedding_model="m") for n in range(15)
        ]

    versions = [v for batch in in_threads(2, write) for v in batch]
    assert sorted(versions) == list(range(1, 31))
    assert stores[0].version == 30 and stores[1].count() == 30
    rows = stores[0].database.query(
        "SELECT version, COUNT(*) FROM exemplar_events GROUP BY version"
    )
    assert sorted(rows) == [(v, 1) for v in range(1, 31)]
    for opened in stores:
        opened.close()


def test_stores_starting_together_apply_the_schema_once(storage: Storage) -> None:
    places = [Storage(storage.url, storage.data_dir) for _ in range(4)]
    stores = in_threads(4, lambda i: ExemplarStore(places[i].open("exemplars")))
    rows = stores[0].database.query(
        "SELECT version, COUNT(*) FROM schema_version WHERE component = 'exemplars' "
        "GROUP BY version ORDER BY version"
    )
    assert rows == [(v, 1) for v in range(1, len(_MIGRATIONS) + 1)]
    stores[0].add([ex("a")], vectors(1), embedding_model="m")
    assert [s.version for s in stores] == [1, 1, 1, 1]
    for opened in stores:
        opened.close()


def test_sqlite_files_opened_together_for_the_first_time_all_open(tmp_path: Path) -> None:
    # Threads racing to switch a new file to WAL: SQLite refuses one of them at once
    # ("database is locked", no busy wait); 1 to 13 rounds in 100 failed before the retry.
    def open_and_close(path: Path, _thread: int) -> None:
        SQLiteDatabase(path).close()

    for round_ in range(150):
        path = tmp_path / f"{round_}.sqlite3"
        in_threads(4, functools.partial(open_and_close, path))
        assert SQLiteDatabase(path).query("PRAGMA journal_mode") == [("wal",)]


def test_a_schema_newer_than_the_code_is_refused_by_name(storage: Storage) -> None:
    store = ExemplarStore(storage.open("exemplars"))
    store.database.execute(
        "INSERT INTO schema_version (component, version, applied_at) VALUES ('exemplars', 99, 0)"
    )
    store.close()
    with pytest.raises(DatabaseError, match=r"schema version 99, newer than .*upgrade tierguard"):
        ExemplarStore(storage.open("exemplars"))


def test_a_file_of_an_older_release_is_migrated_in_place(tmp_path: Path) -> None:
    # A store written before schema versions existed: the first migration's tables, no
    # schema_version table. Opening it keeps its rows and adds what later migrations add.
    old = SQLiteDatabase(tmp_path / "exemplars.sqlite3")
    with old.transaction() as tx:
        for statement in old.schema(_MIGRATIONS[0]).split(";"):
            tx.execute(statement)
        tx.execute("INSERT INTO meta (key, value) VALUES ('index_version', '7')")
    old.close()
    store = ExemplarStore(tmp_path / "exemplars.sqlite3")
    assert store.version == 7
    indexes = {row[0] for row in store.database.query("SELECT name FROM sqlite_master")}
    assert {"exemplars_added", "exemplar_events_version", "schema_version"} <= indexes
    store.close()


def test_each_change_is_announced_on_postgresql(pg_url: str) -> None:
    store = ExemplarStore(Storage(pg_url, Path("unused")).open("exemplars"))
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {INDEX_CHANNEL}")
        store.add([ex("a")], vectors(1), embedding_model="m")
        assert store.delete("missing") is None  # no change, no announcement
        store.delete("a")
        payloads = [n.payload for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert payloads == ["1", "2"]
    store.close()


def test_an_unreachable_database_is_named_in_one_line(tmp_path: Path) -> None:
    url = "postgresql://someone:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
    with pytest.raises(DatabaseError) as caught:
        Storage(url, tmp_path).open("exemplars")
    message = str(caught.value)
    assert message.startswith("cannot connect to postgresql://someone@127.0.0.1:1/nowhere: ")
    assert "hunter2" not in message and "\n" not in message
