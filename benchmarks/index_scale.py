"""Index scale: exact vs approximate FAISS search at 1M exemplars (issue 5).

Builds a realistic corpus of 384-d unit vectors, then measures, for the exact
index and for the approximate index `ExemplarIndex` picks above
`approximate_above`: build time, index memory, peak RSS, single-query latency
(p50 / p90 / p99: one request is one query, the gateway's hot path), batched
throughput and recall@10 against exact search.

The corpus has real structure: every text of `../shared/datasets/*.jsonl` and
of the starter pack is embedded once with the real model (all-MiniLM-L6-v2,
cached), some real vectors are held out as queries, and the rest seed the
corpus: each synthetic vector is a convex mix of a real vector and one of its
nearest real neighbours plus a small perturbation, re-normalised (paraphrase
clusters around real prompts), with a share of mixes of two random real
vectors between the clusters. Queries are the held-out real vectors plus
perturbations of them (never in the corpus).

Each index is built and measured in its own child process, so its peak RSS is
its own. Run from the repository root:

    python benchmarks/index_scale.py                 # 1M exemplars
    python benchmarks/index_scale.py --quick         # 100k, a smoke run
    python benchmarks/index_scale.py --kinds exact,ivf_flat,ivf_sq8,hnsw_flat

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO.parent / "shared" / "datasets"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tierguard"
HELD_OUT = 1_000  # real vectors kept out of the corpus, used as queries
K = 10


# -- corpus ------------------------------------------------------------------


def real_texts() -> list[str]:
    """Every distinct text of the shared datasets and the starter pack (normalised)."""
    from router.normalize import normalized_text

    texts: dict[str, None] = {}
    paths = sorted(DATASETS.glob("*.jsonl")) + sorted(
        (REPO / "embeddings_index/starter").glob("*.jsonl")
    )
    for path in paths:
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                texts.setdefault(normalized_text(json.loads(line)["text"]), None)
    return list(texts)


def real_vectors(cache_dir: Path) -> np.ndarray:
    """The real texts embedded with the shipped model, cached by the texts' hash."""
    texts = real_texts()
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"real-{digest}.npy"
    if path.exists():
        return np.load(path)
    from embeddings_index.embedder import SentenceTransformerEmbedder
    from embeddings_index.starter import load_precomputed_vectors
    from embeddings_index.vector_cache import VectorCache

    embedder = SentenceTransformerEmbedder()
    known = VectorCache(None, embedder.model_id, known=load_precomputed_vectors())
    print(f"embedding {len(texts)} real texts, shipped vectors reused (once; cached in {path})")
    started = time.perf_counter()
    vectors = known.vectors(texts, embedder.encode)
    print(f"  embedded {len(known)} in {time.perf_counter() - started:.0f}s", flush=True)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), vectors)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return vectors


def corpus(cache_dir: Path, size: int, n_queries: int, seed: int) -> tuple[Path, Path, Path]:
    """The corpus, the queries and the exact top-10 of each query, as cached `.npy` files."""
    real = real_vectors(cache_dir)
    tag = f"{size}-{n_queries}-{seed}-{len(real)}"
    paths = tuple(cache_dir / f"{name}-{tag}.npy" for name in ("corpus", "queries", "truth"))
    if all(p.exists() for p in paths):
        return paths  # type: ignore[return-value]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    held_out, seeds = real[order[:HELD_OUT]], real[order[HELD_OUT:]]
    neighbours = _nearest_seeds(seeds, 10)
    print(f"synthesising {size:,} vectors from {len(seeds):,} real ones", flush=True)
    out = np.lib.format.open_memmap(
        paths[0].with_suffix(".tmp.npy"), "w+", np.float32, (size, seeds.shape[1])
    )
    for start in range(0, size, 100_000):
        out[start : start + 100_000] = _synthesise(
            seeds, neighbours, min(100_000, size - start), rng
        )
    out.flush()
    del out
    os.replace(paths[0].with_suffix(".tmp.npy"), paths[0])
    real_queries = held_out[: n_queries - n_queries // 2]
    noisy = _perturb(held_out[rng.integers(len(held_out), size=n_queries // 2)], rng)
    queries = np.ascontiguousarray(np.vstack([real_queries, noisy]), dtype=np.float32)
    np.save(paths[1], queries)
    print(f"exact top-{K} of {len(queries):,} queries (the recall reference)", flush=True)
    import faiss

    _, truth = faiss.knn(
        queries, np.load(paths[0], mmap_mode="r"), K, metric=faiss.METRIC_INNER_PRODUCT
    )
    np.save(paths[2], truth)
    return paths  # type: ignore[return-value]


def _nearest_seeds(seeds: np.ndarray, k: int) -> np.ndarray:
    """For each real vector, its `k` nearest other real vectors."""
    import faiss

    _, found = faiss.knn(seeds, seeds, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return found[:, 1:]


def _synthesise(
    seeds: np.ndarray, neighbours: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Paraphrase-like vectors: 85% mixes of a real vector and a near one, 15% of two random ones."""
    first = rng.integers(len(seeds), size=n)
    near = neighbours[first, rng.integers(neighbours.shape[1], size=n)]
    far = rng.integers(len(seeds), size=n)
    bridge = rng.random(n) < 0.15
    second = np.where(bridge, far, near)
    weight = np.where(bridge, rng.uniform(0.3, 0.7, n), rng.uniform(0.5, 1.0, n)).astype(np.float32)
    mixed = weight[:, None] * seeds[first] + (1 - weight[:, None]) * seeds[second]
    return _perturb(mixed, rng)


def _perturb(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add isotropic noise of 20-60% of each vector's norm (cosine ~0.86-0.98), re-normalise."""
    noise = rng.standard_normal(vectors.shape, dtype=np.float32)
    noise *= (rng.uniform(0.2, 0.6, len(vectors)) * np.linalg.norm(vectors, axis=1))[:, None]
    noise /= np.sqrt(vectors.shape[1])
    out = vectors + noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


# -- one index, measured in a child process -----------------------------------


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Build one index over the corpus and measure it (runs in its own process)."""
    from embeddings_index.faiss_index import ExemplarIndex
    from embeddings_index.snapshot import load_snapshot, save_snapshot

    options = _options(args.kind, args)
    vectors = np.load(args.corpus)  # in RAM, as the manager holds the store's vectors
    queries, truth = np.load(args.queries_file), np.load(args.truth)
    n = len(vectors)
    ids = [f"x{i}" for i in range(n)]
    labels = ["risky" if i % 2 else "benign" for i in range(n)]
    categories = ["synthetic"] * n
    rss_before = _rss_now()
    started = time.perf_counter()
    index = ExemplarIndex(
        version=1,
        model_id="bench",
        ids=ids,
        labels=labels,
        categories=categories,
        vectors=vectors,
        options=options,
    )
    build_s = time.perf_counter() - started
    index_bytes = _rss_now() - rss_before  # what the build added (the vectors were in RAM before)
    del vectors
    if args.nice:
        os.nice(args.nice)  # only for the timing below; see --nice
    result: dict[str, object] = {
        "kind": args.kind,
        "structure": index.structure,
        "options": _describe(options, index.structure, n),
        "size": n,
        "build_s": round(build_s, 2),
        "index_mib": round(index_bytes / 2**20, 1),
    }
    limit = args.exact_queries if index.structure == "flat" else len(queries)
    single = _single(index, queries[:limit])
    result |= {f"single_{key}": value for key, value in single.items() if key != "found"}
    result["recall_at_10"] = _recall(single["found"], truth[:limit])
    two_threads = ExemplarIndex.from_state(index.state, _replace(options, search_threads=2))
    if args.threads_two:
        two = _single(two_threads, queries[: min(limit, 500)])
        result |= {f"single2t_{key}": value for key, value in two.items() if key != "found"}
    result["batch64_qps_1t"] = _batched(index, queries[: max(limit, 256)], 64)
    result["batch64_qps_2t"] = _batched(two_threads, queries[: max(limit, 256)], 64)
    if index.approximate and args.sweep:
        result["sweep"] = _sweep(index, queries, truth, args)
    if index.approximate:
        result["with_changes"] = _with_changes(index, queries, truth, n)
    result["peak_rss_mib"] = round(_peak_rss() / 2**20, 1)
    if args.snapshot_dir:
        result |= _snapshot_times(
            index, Path(args.snapshot_dir) / args.kind, options, save_snapshot, load_snapshot
        )
    return result


def _options(kind: str, args: argparse.Namespace):  # -> IndexOptions
    from embeddings_index.faiss_index import IndexOptions

    if kind == "exact":
        return IndexOptions(approximate_above=sys.maxsize)
    knobs: dict[str, object] = {}
    if kind != "approximate":
        knobs["structure"] = kind
    for name in ("nprobe", "nlist", "ef_search", "hnsw_m", "ef_construction"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    return IndexOptions(approximate_above=0, **knobs)


def _describe(options, structure: str, n: int) -> str:
    if structure == "flat":
        return "IndexFlatIP"
    if structure == "hnsw":
        return f"M={options.hnsw_m} efC={options.ef_construction} efSearch={options.ef_search}"
    return f"nlist={options.lists_for(n)} nprobe={options.nprobe}"


def _single(index, queries: np.ndarray) -> dict[str, object]:
    """One query per call, as one request is served: wall and CPU time per search."""
    for q in queries[:50]:
        index.search(q[None, :], K)  # warm up
    wall, cpu, found = [], [], []
    for q in queries:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        [neighbours] = index.search(q[None, :], K)
        wall.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
        found.append(neighbours.positions)
    ms, cpu_ms = np.array(wall) / 1e6, np.array(cpu) / 1e6
    return {
        "queries": len(queries),
        "p50_ms": _r(np.percentile(ms, 50)),
        "p90_ms": _r(np.percentile(ms, 90)),
        "p99_ms": _r(np.percentile(ms, 99)),
        "max_ms": _r(ms.max()),
        "cpu_p50_ms": _r(np.percentile(cpu_ms, 50)),
        "cpu_p90_ms": _r(np.percentile(cpu_ms, 90)),
        "cpu_p99_ms": _r(np.percentile(cpu_ms, 99)),
        "found": found,
    }


def _batched(index, queries: np.ndarray, batch: int) -> float:
    """Queries per second searched in batches of `batch` (the micro-batcher's maximum)."""
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start : start + batch], K)
    return round(len(queries) / (time.perf_counter() - started), 1)


def _recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)]
    return round(float(np.mean(hits)), 4)


def _sweep(index, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Recall and latency at other search-time knobs, on the same built index."""
    from embeddings_index.faiss_index import ExemplarIndex

    knob = "ef_search" if index.structure == "hnsw" else "nprobe"
    values = [8, 16, 24, 32, 48, 64, 96, 128] if knob == "nprobe" else [32, 48, 64, 96, 128, 192]
    rows = []
    for value in values:
        options = _replace(index.options, **{knob: value})
        variant = ExemplarIndex.from_state(index.state, options)
        single = _single(variant, queries[: args.sweep_queries])
        rows.append(
            {
                knob: value,
                "recall_at_10": _recall(single.pop("found"), truth[: args.sweep_queries]),
                **{k: v for k, v in single.items() if k in ("p50_ms", "p99_ms", "cpu_p99_ms")},
            }
        )
        print(f"    {knob}={value}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _with_changes(index, queries: np.ndarray, truth: np.ndarray, n: int) -> dict[str, object]:
    """Search after live changes: 1% of the base removed, 1,000 exemplars in the delta."""
    rng = np.random.default_rng(1)
    removed = rng.choice(n, n // 100, replace=False)
    added = queries[rng.integers(len(queries), size=1000)] + 0.01
    added /= np.linalg.norm(added, axis=1, keepdims=True)
    started = time.perf_counter()
    changed = index.with_changes(
        version=2,
        ids=[f"d{i}" for i in range(1000)],
        labels=["risky"] * 1000,
        categories=["synthetic"] * 1000,
        vectors=added,
        removed_ids=[f"x{i}" for i in removed],
    )
    derive_s = time.perf_counter() - started
    single = _single(changed, queries)
    dead = set(removed.tolist())
    leaked = sum(int(p) in dead for found in single["found"] for p in found)
    return {
        "derive_s": _r(derive_s),
        "p50_ms": single["p50_ms"],
        "p99_ms": single["p99_ms"],
        "removed_returned": leaked,
    }


def _snapshot_times(index, directory: Path, options, save, load) -> dict[str, object]:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    save(directory, index)
    save_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in directory.iterdir())
    started = time.perf_counter()
    loaded = load(directory, version=index.version, model_id=index.model_id, options=options)
    load_s = time.perf_counter() - started
    assert loaded is not None and len(loaded) == len(index)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "snapshot_save_s": _r(save_s),
        "snapshot_load_s": _r(load_s),
        "snapshot_mib": round(size / 2**20, 1),
    }


def _replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it restarts at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _r(value: float) -> float:
    return round(float(value), 3)


# -- the run -------------------------------------------------------------------


COLUMNS = [
    ("index", "kind", "{}"),
    ("structure", "options", "{}"),
    ("build s", "build_s", "{:.1f}"),
    ("index MiB", "index_mib", "{:,.0f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
    ("p50 ms", "single_p50_ms", "{:.3f}"),
    ("p90 ms", "single_p90_ms", "{:.3f}"),
    ("p99 ms", "single_p99_ms", "{:.3f}"),
    ("p99 CPU ms", "single_cpu_p99_ms", "{:.3f}"),
    ("batch64 q/s 1t", "batch64_qps_1t", "{:,.0f}"),
    ("batch64 q/s 2t", "batch64_qps_2t", "{:,.0f}"),
    ("recall@10", "recall_at_10", "{:.4f}"),
]


def table(results: list[dict[str, object]]) -> str:
    rows = [[title for title, _, _ in COLUMNS]]
    for result in results:
        rows.append([fmt.format(result[key]) if key in result else "-" for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="exemplars in the corpus")
    parser.add_argument("--quick", action="store_true", help="100k exemplars: a smoke run")
    parser.add_argument(
        "--kinds",
        default="exact,approximate",
        help="comma-separated: exact, approximate (the defaults), ivf_flat, ivf_sq8, hnsw",
    )
    parser.add_argument(
        "--queries", type=int, default=2_000, help="queries (half real held-out, half perturbed)"
    )
    parser.add_argument(
        "--exact-queries",
        type=int,
        default=500,
        help="single queries timed on the exact index (slow at 1M)",
    )
    parser.add_argument("--nprobe", type=int, help="override IndexOptions.nprobe")
    parser.add_argument("--nlist", type=int, help="override IndexOptions.nlist")
    parser.add_argument("--ef-search", type=int, help="override IndexOptions.ef_search")
    parser.add_argument("--hnsw-m", type=int, help="override IndexOptions.hnsw_m")
    parser.add_argument("--ef-construction", type=int, help="override IndexOptions.ef_construction")
    parser.add_argument("--sweep", action="store_true", help="also sweep nprobe / efSearch")
    parser.add_argument("--sweep-queries", type=int, default=1_000)
    parser.add_argument(
        "--threads-two", action="store_true", help="also time single queries with 2 OpenMP threads"
    )
    parser.add_argument(
        "--snapshot-dir",
        type=Path,
        default=Path("/tmp/tierguard-index-scale"),
        help="where to time snapshot save/load ('' to skip)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness increment for the timing phase (negative, as root: time searches that "
        "get a core on a busy shared machine; default 0)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="embeddings and corpus cache"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write results here (default: in the cache dir)")
    parser.add_argument("--kind", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size = 100_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.kind:  # the child: measure one index, write its JSON
        result = measure(args)
        args.out.write_text(json.dumps(result))
        return 0
    cache = args.cache_dir
    corpus_path, queries_path, truth_path = corpus(cache, args.size, args.queries, args.seed)
    results = []
    load_before = os.getloadavg()
    for kind in args.kinds.split(","):
        out = cache / f"result-{kind}-{os.getpid()}.json"
        command = [
            sys.executable,
            __file__,
            "--kind",
            kind,
            "--corpus",
            str(corpus_path),
            "--queries-file",
            str(queries_path),
            "--truth",
            str(truth_path),
            "--out",
            str(out),
            "--exact-queries",
            str(args.exact_queries),
            "--sweep-queries",
            str(args.sweep_queries),
            "--snapshot-dir",
            str(args.snapshot_dir),
            "--nice",
            str(args.nice),
        ]
        for flag in ("nprobe", "nlist", "ef_search", "hnsw_m", "ef_construction"):
            if getattr(args, flag) is not None:
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        command += ["--sweep"] * args.sweep + ["--threads-two"] * args.threads_two
        print(f"measuring {kind} over {args.size:,} vectors ...", flush=True)
        subprocess.run(command, check=True)
        results.append(json.loads(out.read_text()))
        out.unlink()
        print(table(results[-1:]), flush=True)
    report = {
        "size": args.size,
        "queries": args.queries,
        "nice": args.nice,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "results": results,
    }
    path = args.json or cache / f"index_scale-{args.size}.json"
    path.write_text(json.dumps(report, indent=1))
    print()
    print(table(results))
    for result in results:
        if "with_changes" in result:
            print(
                f"{result['kind']} after live changes (1% removed, 1,000 added): {result['with_changes']}"
            )
        if "snapshot_save_s" in result:
            print(
                f"{result['kind']} snapshot: {result['snapshot_mib']} MiB, save {result['snapshot_save_s']} s, "
                f"load {result['snapshot_load_s']} s"
            )
    print(f"load average before/after: {load_before} / {report['machine']['loadavg_after']}")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
