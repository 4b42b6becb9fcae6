"""The FAISS index of exemplar vectors, as an immutable snapshot.

An `ExemplarIndex` is never changed after it is built: a change to the
exemplars builds a new one aside, and whoever holds the current one swaps a
reference (`IndexHolder.swap`). Checks in flight keep the snapshot they
started with, so a rebuild never blocks or tears a search.

The structure follows the size (`IndexOptions`): exact inner-product search
(`IndexFlatIP`) up to `approximate_above` exemplars, an approximate index
above it (IVF-Flat by default; IVF with 8-bit scalar quantisation or HNSW on
request). `benchmarks/index_scale.py` measured the defaults.

An approximate index is expensive to build, so a snapshot derived from it by
`with_changes` shares its trained base and keeps what changed since on the
side: added exemplars in a small exact "delta" index searched alongside (its
hits merged by similarity), removed ones as a bitmap that every search of the
base honours inside FAISS (an `IDSelectorBitmap`), so a deletion takes effect
at once and a search still returns k live neighbours. A full rebuild (the
manager's, once the delta outgrows `max_delta`) merges both into a new base.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faiss
import numpy as np

from embeddings_index.vocabulary import Label

__all__ = [
    "APPROXIMATE_STRUCTURES",
    "ExemplarIndex",
    "IndexHolder",
    "IndexOptions",
    "IndexState",
    "Neighbors",
]

RISKY, BENIGN = 1, 0

EXACT = "flat"
APPROXIMATE_STRUCTURES = ("ivf_flat", "ivf_sq8", "hnsw")


@dataclass(frozen=True, slots=True)
class Neighbors:
    """The k nearest exemplars of one query, most similar first.

    Attributes:
        similarities: Cosine similarities, shape (k',), k' <= k.
        positions: Positions in the index (see `ExemplarIndex.ids`), shape (k',).
        risky: True where the neighbour is a risky exemplar, shape (k',).
    """

    similarities: np.ndarray
    positions: np.ndarray
    risky: np.ndarray


@dataclass(frozen=True, slots=True)
class IndexOptions:
    """How an `ExemplarIndex` is built and searched.

    The defaults meet issue 5's bar at 1M exemplars on a 2-core machine (search
    p99 <= 2 ms, recall@10 >= 0.95 against exact search); see
    `benchmarks/index_scale.py` for the numbers.

    Attributes:
        approximate_above: Exact search up to this many exemplars, approximate above.
        structure: The approximate structure: "ivf_flat", "ivf_sq8" or "hnsw".
        nlist: IVF inverted lists; 0 picks about 4 * sqrt(n) (at most n / 40).
        nprobe: IVF lists searched per query (search time: recall against speed).
        train_per_list: IVF k-means training points per list (a sample of the vectors).
        hnsw_m: HNSW links per node.
        ef_construction: HNSW candidate list while building.
        ef_search: HNSW candidate list per query (search time).
        max_delta: Changes to an approximate index since its build that
            `with_changes` keeps on the side (additions in the exact side index,
            removals in the deletion bitmap, which every search still scans);
            past it, rebuild.
        search_threads: OpenMP threads FAISS may use for one `search` call, set
            on the calling thread before each search (FAISS's OpenMP setting is
            per thread: `faiss.omp_set_num_threads` at start-up does not reach
            the worker threads that search). 1 by default: on a small, shared
            machine a second thread inside one search waits on a busy core and
            multiplies the latency, and concurrent requests already use the
            cores. 0 leaves FAISS's setting alone.
    """

    approximate_above: int = 20_000
    structure: str = "ivf_flat"
    nlist: int = 0
    nprobe: int = 24
    train_per_list: int = 64
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 96
    max_delta: int = 20_000
    search_threads: int = 1

    def __post_init__(self) -> None:
        if self.structure not in APPROXIMATE_STRUCTURES:
            raise ValueError(f"structure must be one of {APPROXIMATE_STRUCTURES}")
        for name in ("nprobe", "train_per_list", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("approximate_above", "nlist", "max_delta", "search_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def structure_for(self, size: int) -> str:
        """The structure an index of `size` exemplars is built with."""
        return EXACT if size <= self.approximate_above else self.structure

    def lists_for(self, size: int) -> int:
        """IVF lists for `size` exemplars."""
        if self.nlist:
            return min(self.nlist, max(1, size))
        return max(1, min(round(4 * math.sqrt(size)), size // 40))

    def build_key(self, size: int) -> dict[str, object]:
        """What the base structure of `size` exemplars depends on (snapshots compare it)."""
        structure = self.structure_for(size)
        key: dict[str, object] = {"structure": structure}
        if structure.startswith("ivf"):
            key |= {"nlist": self.lists_for(size), "train_per_list": self.train_per_list}
        elif structure == "hnsw":
            key |= {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction}
        return key


@dataclass(frozen=True, slots=True)
class IndexState:
    """Everything an `ExemplarIndex` is made of; what a snapshot saves and loads.

    The base is the FAISS index over positions 0..len(base_ids)-1; the delta
    holds exemplars added since the base was built (positions after the
    base's); `dead` lists base positions removed since.
    """

    version: int
    model_id: str
    dim: int
    structure: str
    base_token: str
    base: faiss.Index
    base_ids: list[str]
    base_risky: np.ndarray
    base_categories: list[str]
    delta_vectors: np.ndarray
    delta_ids: list[str]
    delta_risky: np.ndarray
    delta_categories: list[str]
    dead: np.ndarray


@dataclass(slots=True)
class _Base:
    """A built FAISS structure and its labels, shared by the snapshots derived from it."""

    index: faiss.Index
    structure: str
    token: str
    ids: list[str]
    risky: np.ndarray
    categories: list[str]
    _positions: dict[str, int] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def position(self, exemplar_id: str) -> int | None:
        with self._lock:
            if self._positions is None:
                self._positions = {eid: i for i, eid in enumerate(self.ids)}
        return self._positions.get(exemplar_id)


class ExemplarIndex:
    """Inner-product search over unit vectors (cosine similarity), exact or approximate."""

    def __init__(
        self,
        *,
        version: int,
        model_id: str,
        ids: Sequence[str],
        labels: Sequence[str],
        categories: Sequence[str],
        vectors: np.ndarray,
        options: IndexOptions | None = None,
    ) -> None:
        if not len(ids) == len(labels) == len(categories) == len(vectors):
            raise ValueError("ids, labels, categories and vectors must have the same length")
        self.options = options or IndexOptions()
        dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 0
        risky = np.array([label == Label.RISKY for label in labels], dtype=bool)
        structure = self.options.structure_for(len(ids))
        base = _Base(
            index=_build(structure, dim or 1, vectors, self.options),
            structure=structure,
            token=uuid.uuid4().hex,
            ids=list(ids),
            risky=risky,
            categories=list(categories),
        )
        empty = np.zeros((0, dim or 1), dtype=np.float32)
        self._init(version, model_id, dim, base, empty, [], risky[:0], [], np.zeros(0, np.int64))

    def _init(
        self,
        version: int,
        model_id: str,
        dim: int,
        base: _Base,
        delta_vectors: np.ndarray,
        delta_ids: list[str],
        delta_risky: np.ndarray,
        delta_categories: list[str],
        dead: np.ndarray,
    ) -> None:
        self.version = version
        self.model_id = model_id
        self.dim = dim
        self._base = base
        self._delta_vectors = delta_vectors
        self._dead = np.unique(dead.astype(np.int64))
        self.ids = base.ids + delta_ids if delta_ids else base.ids
        self.categories = base.categories + delta_categories if delta_ids else base.categories
        self.risky = np.concatenate([base.risky, delta_risky]) if delta_ids else base.risky
        self._delta: faiss.Index | None = None
        if len(delta_ids):
            self._delta = faiss.IndexFlatIP(delta_vectors.shape[1])
            self._delta.add(delta_vectors)
        self._base_params = _search_params(base.structure, self.options, self._alive_bitmap())

    @classmethod
    def from_state(cls, state: IndexState, options: IndexOptions | None = None) -> ExemplarIndex:
        """An index made of `state` (as `state` returned it); search knobs from `options`."""
        self = cls.__new__(cls)
        self.options = options or IndexOptions()
        base = _Base(
            state.base,
            state.structure,
            state.base_token,
            state.base_ids,
            state.base_risky,
            state.base_categories,
        )
        self._init(
            state.version,
            state.model_id,
            state.dim,
            base,
            state.delta_vectors,
            state.delta_ids,
            state.delta_risky,
            state.delta_categories,
            state.dead,
        )
        return self

    @property
    def state(self) -> IndexState:
        """What this index is made of (shares, never copies, the FAISS base)."""
        n_base = len(self._base.ids)
        return IndexState(
            version=self.version,
            model_id=self.model_id,
            dim=self.dim,
            structure=self._base.structure,
            base_token=self._base.token,
            base=self._base.index,
            base_ids=self._base.ids,
            base_risky=self._base.risky,
            base_categories=self._base.categories,
            delta_vectors=self._delta_vectors,
            delta_ids=self.ids[n_base:],
            delta_risky=self.risky[n_base:],
            delta_categories=self.categories[n_base:],
            dead=self._dead,
        )

    @property
    def structure(self) -> str:
        """The FAISS structure of the base: "flat" (exact) or an approximate one."""
        return self._base.structure

    @property
    def approximate(self) -> bool:
        """True when searches may miss a true neighbour (recall below 1)."""
        return self._base.structure != EXACT

    @property
    def delta_size(self) -> int:
        """Exemplars added since the base was built, searched exactly beside it."""
        return len(self._delta_vectors)

    @property
    def changes_since_build(self) -> int:
        """Additions in the side index plus removals from the base, since the base was built."""
        return len(self._delta_vectors) + len(self._dead)

    def __len__(self) -> int:
        """Live exemplars (`ids` also keeps removed ones, which no search returns)."""
        return len(self.ids) - len(self._dead)

    def live_among(self, exemplar_ids: Sequence[str]) -> set[str]:
        """Those of `exemplar_ids` that this snapshot holds live (searches may return them)."""
        n_base = len(self._base.ids)
        dead = set(self._dead.tolist())
        delta = set(self.ids[n_base:])
        live = set()
        for eid in exemplar_ids:
            position = self._base.position(eid)
            if (position is not None and position not in dead) or eid in delta:
                live.add(eid)
        return live

    def label(self, position: int) -> str:
        """The label of the exemplar at `position`."""
        return Label.RISKY if self.risky[position] else Label.BENIGN

    def search(self, queries: np.ndarray, k: int) -> list[Neighbors]:
        """The `k` nearest exemplars of each query row (fewer if the index is smaller)."""
        k = min(k, len(self))
        if k <= 0:
            empty = np.zeros(0, dtype=np.float32)
            return [Neighbors(empty, empty.astype(np.int64), empty.astype(bool)) for _ in queries]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.options.search_threads:
            faiss.omp_set_num_threads(self.options.search_threads)
        sims, positions = self._base.index.search(queries, k, params=self._base_params)
        if self._delta is not None:
            extra_sims, extra = self._delta.search(queries, min(k, self._delta.ntotal))
            extra = np.where(extra >= 0, extra + len(self._base.ids), -1)
            sims, positions = _merge(sims, positions, extra_sims, extra, k)
        results = []
        for row_sims, row_positions in zip(sims, positions, strict=True):
            valid = row_positions >= 0
            row_positions = row_positions[valid]
            results.append(Neighbors(row_sims[valid], row_positions, self.risky[row_positions]))
        return results

    def with_changes(
        self,
        *,
        version: int,
        ids: Sequence[str] = (),
        labels: Sequence[str] = (),
        categories: Sequence[str] = (),
        vectors: np.ndarray | None = None,
        removed_ids: Sequence[str] = (),
    ) -> ExemplarIndex:
        """A new snapshot at `version`: this one plus `ids`, minus `removed_ids`.

        It shares this snapshot's base (no retraining, no copy of the FAISS
        structure): additions go to the exact delta index, removals of base
        exemplars to the dead bitmap. Unknown removed ids are ignored.
        """
        if (
            not len(ids)
            == len(labels)
            == len(categories)
            == (0 if vectors is None else len(vectors))
        ):
            raise ValueError("ids, labels, categories and vectors must have the same length")
        n_base = len(self._base.ids)
        removed = set(removed_ids)
        dead = [self._base.position(eid) for eid in removed]
        keep = [i for i, eid in enumerate(self.ids[n_base:]) if eid not in removed]
        delta_vectors = self._delta_vectors[keep]
        new = np.ascontiguousarray(vectors, dtype=np.float32) if len(ids) else delta_vectors[:0]
        derived = ExemplarIndex.__new__(ExemplarIndex)
        derived.options = self.options
        derived._init(
            version,
            self.model_id,
            self.dim,
            self._base,
            np.concatenate([delta_vectors, new.reshape(-1, delta_vectors.shape[1])]),
            [self.ids[n_base + i] for i in keep] + list(ids),
            np.concatenate(
                [self.risky[n_base:][keep], np.array([x == Label.RISKY for x in labels], bool)]
            ),
            [self.categories[n_base + i] for i in keep] + list(categories),
            np.concatenate([self._dead, np.array([p for p in dead if p is not None], np.int64)]),
        )
        return derived

    def _alive_bitmap(self) -> np.ndarray | None:
        """Bit i set while base position i is live, or None when all are (LSB first)."""
        if not len(self._dead):
            return None
        alive = np.ones(len(self._base.ids), dtype=bool)
        alive[self._dead] = False
        return np.packbits(alive, bitorder="little")


def _build(structure: str, dim: int, vectors: np.ndarray, options: IndexOptions) -> faiss.Index:
    """A FAISS index of `structure` holding `vectors` (rows are positions)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    n = len(vectors)
    index: faiss.Index
    if structure == EXACT:
        index = faiss.IndexFlatIP(dim)
    elif structure == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = options.ef_construction
        index = hnsw
    else:
        nlist = options.lists_for(n)
        quantizer = faiss.IndexFlatIP(dim)
        ivf: faiss.IndexIVF
        if structure == "ivf_flat":
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        ivf.cp.min_points_per_centroid = 1  # a small sample is fine; no warning spam
        sample = min(n, nlist * options.train_per_list)
        rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
        ivf.train(vectors[rows])
        index = ivf
    if n:
        for start in range(0, n, 262_144):  # bounded temporary memory while adding
            index.add(vectors[start : start + 262_144])
    return index


def _search_params(
    structure: str, options: IndexOptions, alive: np.ndarray | None
) -> faiss.SearchParameters | None:
    """Per-search knobs (never set on the shared index) and the live-position filter."""
    # faiss's Python layer wraps these SWIG classes (a bitmap from a numpy array, HNSW
    # parameters); its type stubs describe only the C++ signatures, so they go untyped here.
    untyped: Any = faiss
    selector = untyped.IDSelectorBitmap(alive) if alive is not None else None
    params: Any
    if structure == "hnsw":
        params = untyped.SearchParametersHNSW()
        params.efSearch = options.ef_search
    elif structure.startswith("ivf"):
        params = untyped.SearchParametersIVF()
        params.nprobe = options.nprobe
    elif selector is None:
        return None
    else:
        params = untyped.SearchParameters()
    if selector is not None:
        params.sel = selector
        params._keep = (selector, alive)  # the selector points into `alive`
    return cast(faiss.SearchParameters, params)


def _merge(
    sims: np.ndarray, positions: np.ndarray, more_sims: np.ndarray, more: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of two result sets per row, most similar first."""
    all_positions = np.concatenate([positions, more], axis=1)
    all_sims = np.where(all_positions >= 0, np.concatenate([sims, more_sims], axis=1), -np.inf)
    order = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_sims, order, 1), np.take_along_axis(all_positions, order, 1)


class IndexHolder:
    """Holds the current index; `swap` replaces it atomically for new searches."""

    def __init__(self, index: ExemplarIndex) -> None:
        self._index = index
        self._lock = threading.Lock()

    @property
    def current(self) -> ExemplarIndex:
        """The index new searches should use."""
        return self._index

    def swap(self, index: ExemplarIndex, *, force: bool = False) -> None:
        """Make `index` current unless a newer version is already in place (or `force`:
        the store itself went back, as when restored from a backup)."""
        with self._lock:
            if force or index.version >= self._index.version:
                self._index = index
