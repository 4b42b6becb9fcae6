"""LRUCache: bounded, least recently used out first, and bound to one generation when asked."""

from __future__ import annotations

from embeddings_index.lru import LRUCache


class Snapshot:
    """Stands for an index snapshot: compared by identity, as the route cache does."""


def test_least_recently_used_goes_first() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, 1, 3)
    assert (cache.hits, cache.misses) == (3, 1)


def test_capacity_zero_keeps_nothing() -> None:
    cache: LRUCache[str, int] = LRUCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_a_new_generation_empties_the_cache_and_a_replaced_one_is_not_stored() -> None:
    old, new = Snapshot(), Snapshot()
    cache: LRUCache[str, str] = LRUCache(10)
    assert cache.get("text", generation=old) is None
    cache.put("text", "routed on old", generation=old)
    assert cache.get("text", generation=old) == "routed on old"
    assert cache.get("other", generation=new) is None  # the first look with `new`...
    assert cache.values() == []  # ...dropped every entry of `old`
    cache.put("late", "routed on old after the swap", generation=old)
    assert cache.values() == []  # a result of a replaced snapshot does not come back
    cache.put("text", "routed on new", generation=new)
    assert cache.get("text", generation=new) == "routed on new"
    assert cache.values() == ["routed on new"]
