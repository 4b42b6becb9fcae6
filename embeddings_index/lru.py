"""A small thread-safe LRU map: repeated prompts cost a lookup, memory stays bounded."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `capacity` entries; the least recently used goes first. Capacity 0 disables it.

    Values computed from something that gets replaced (the route cache's values
    hold the index snapshot they were routed on) belong to a *generation*: the
    cache holds one generation at a time. A `get` with another generation
    empties it first, and a `put` for any generation but the cache's is dropped,
    so values of a replaced generation neither linger (keeping what they
    reference alive) nor come back. Without `generation` it is a plain LRU map.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._generation: object = None
        self.hits = 0
        self.misses = 0

    def get(self, key: K, *, generation: object = None) -> V | None:
        """The value for `key` (now the most recent), or None.

        A `generation` that is not the cache's (by identity) drops every entry
        and becomes the cache's generation.
        """
        with self._lock:
            if generation is not self._generation:
                self._items.clear()
                self._generation = generation
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V, *, generation: object = None) -> None:
        """Store `value`, evicting the least recently used entry when full.

        Dropped unless `generation` is the cache's: a value computed from a
        replaced generation (or one the cache has not seen yet) is not kept.
        """
        if self.capacity <= 0:
            return
        with self._lock:
            if generation is not self._generation:
                return
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def values(self) -> list[V]:
        """The cached values, least recently used first (a copy)."""
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
