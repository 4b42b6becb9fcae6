"""Do the ONNX backends give the torch model's vectors and decisions?

Why: int8 (and, in principle, a bad export) moves vectors; what matters is
whether routing moves. This embeds every text of the labelled files (after
tier-0 normalisation, as the gateway does) with the torch model, ONNX fp32 and
ONNX int8, reports the cosine of each ONNX vector to the torch vector, then
routes every text through `gateway.offline.evaluate.OfflineRouter.route_rows` built on
each embedder and counts the ALLOW / ESCALATE / BLOCK decisions that change.

int8 is measured twice: as a gateway runs it by default (int8 has its own
model id, so the starter pack is re-embedded in int8 too: about a minute), and
with int8 queries against the stored torch exemplar vectors (what sharing the
torch model id would give).

    python benchmarks/agreement.py                     # all of ../shared/datasets
    python benchmarks/agreement.py --json agreement.json --data FILE.jsonl ...

Vectors are cached under --work-dir (keyed by model, backend and texts), so a
second run only routes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from _common import DEFAULT_DATA, DEFAULT_WORK_DIR

from embeddings_index.embedder import Embedder, SentenceTransformerEmbedder
from embeddings_index.onnx_embedder import OnnxEmbedder, model_fingerprint
from gateway.offline.evaluate import OfflineRouter
from gateway.runtime.config import Config
from router.evaluation import LabelledText, read_labelled
from router.normalize import normalized_text

MAX_DECISION_CHANGE = 0.005  # the bar for turning int8 on by default


class MemoEmbedder:
    """An embedder that answers known texts from precomputed vectors.

    Why: embedding all texts takes minutes on torch; the cosine statistics and
    the routing both need the same vectors, so they are computed once.
    """

    def __init__(self, inner: Embedder, vectors: dict[str, np.ndarray], model_id: str) -> None:
        self._inner = inner
        self._vectors = vectors
        self._model_id = model_id

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._inner.encode(missing), strict=True))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts]).astype(np.float32, copy=False)


def cached_vectors(
    name: str, key: str, texts: Sequence[str], build: Callable[[], Embedder], work_dir: Path
) -> tuple[np.ndarray, Embedder | None, float | None]:
    """Vectors of `texts` by one backend, from the work dir's cache when present."""
    digest = hashlib.sha256(key.encode() + b"\0" + "\0".join(texts).encode()).hexdigest()[:24]
    path = work_dir / "vectors" / f"{name}-{digest}.npy"
    if path.is_file():
        return np.load(path), None, None
    embedder = build()
    start = time.perf_counter()
    vectors = embedder.encode(list(texts))
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, embedder, seconds


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """min / p0.1 / p1 / median of row-wise cosines, and the share below 0.99."""
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "min": float(cos.min()),
        "p0.1": float(np.percentile(cos, 0.1)),
        "p1": float(np.percentile(cos, 1)),
        "median": float(np.median(cos)),
        "share_below_0.99": float(np.mean(cos < 0.99)),
    }


def route_all(
    rows: Sequence[LabelledText], embedder: Embedder, data_dir: Path, policy: str
) -> tuple[list[str], list[float]]:
    """Routes and risk scores of every row on a fresh router built on `embedder`."""
    offline = OfflineRouter.create(Config(data_dir=data_dir), embedder=embedder)
    results = offline.route_rows(rows, policy_name=policy)
    return [r.route.name for r in results], [r.risk_score for r in results]


def compare(
    rows: Sequence[LabelledText],
    base: tuple[list[str], list[float]],
    other: tuple[list[str], list[float]],
) -> dict[str, object]:
    """The share of decisions that differ, by transition and by file."""
    changed = [i for i, (a, b) in enumerate(zip(base[0], other[0], strict=True)) if a != b]
    by_file = Counter(rows[i].file for i in changed)
    return {
        "changed": len(changed),
        "share_changed": len(changed) / len(rows),
        "transitions": dict(Counter(f"{base[0][i]}->{other[0][i]}" for i in changed)),
        "by_file": dict(sorted(by_file.items())),
        "max_abs_risk_diff": float(np.max(np.abs(np.subtract(base[1], other[1])))),
        "examples": [
            {
                "file": rows[i].file,
                "id": rows[i].id,
                "from": base[0][i],
                "to": other[0][i],
                "risk": [round(base[1][i], 4), round(other[1][i], 4)],
            }
            for i in changed[:10]
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print agreement; write JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        help=f"labelled JSONL files (default: {DEFAULT_DATA}/*.jsonl)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="ONNX exports, cached vectors and scratch stores",
    )
    parser.add_argument("--policy", default="", help="policy whose thresholds apply")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--no-int8-reembed",
        action="store_true",
        help="skip the int8 gateway with its own (re-embedded) index; keep the torch-index one",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    paths = args.data or sorted(DEFAULT_DATA.glob("*.jsonl"))
    rows = [row for path in paths for row in read_labelled(path)]
    texts = list(dict.fromkeys(normalized_text(r.text) for r in rows))
    print(f"{len(rows)} rows ({len(texts)} distinct normalised texts) from {len(paths)} files")
    models = args.work_dir / "models"
    fingerprint = model_fingerprint()

    builders: dict[str, Callable[[], Embedder]] = {
        "torch": SentenceTransformerEmbedder,
        "onnx-fp32": lambda: OnnxEmbedder(models),
        "onnx-int8": lambda: OnnxEmbedder(models, quantize=True),
    }
    vectors: dict[str, np.ndarray] = {}
    embedders: dict[str, Embedder] = {}
    for name, build in builders.items():
        vecs, embedder, seconds = cached_vectors(
            name, f"{name}/{fingerprint}", texts, build, args.work_dir
        )
        vectors[name] = vecs
        embedders[name] = embedder or build()
        speed = f"{len(texts) / seconds:.0f} texts/s" if seconds else "cached"
        print(f"embedded with {name}: {speed}", flush=True)

    cosines = {
        name: cosine_stats(vectors[name], vectors["torch"]) for name in ("onnx-fp32", "onnx-int8")
    }
    scratch = Path(tempfile.mkdtemp(prefix="agreement-", dir=args.work_dir))
    gateways = [  # (label, backend, the model id its index is kept under)
        ("onnx-fp32", "onnx-fp32", embedders["onnx-fp32"].model_id),
        ("onnx-int8 (torch index)", "onnx-int8", embedders["torch"].model_id),
    ]
    if not args.no_int8_reembed:
        gateways.append(("onnx-int8", "onnx-int8", embedders["onnx-int8"].model_id))
    runs: dict[str, tuple[list[str], list[float]]] = {}
    for label, name, model_id in [("torch", "torch", embedders["torch"].model_id), *gateways]:
        memo = MemoEmbedder(embedders[name], dict(zip(texts, vectors[name], strict=True)), model_id)
        if model_id != embedders["torch"].model_id:
            print(f"{label}: embedding the starter pack for its own index ...", flush=True)
        runs[label] = route_all(rows, memo, scratch / label.replace(" ", "_"), args.policy)

    decisions = {name: compare(rows, runs["torch"], run) for name, run in runs.items()}
    decisions.pop("torch")
    print_report(len(rows), cosines, decisions)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": len(rows),
                    "texts": len(texts),
                    "cosine_to_torch": cosines,
                    "decisions_vs_torch": decisions,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


def print_report(
    n: int, cosines: dict[str, dict[str, float]], decisions: dict[str, dict[str, object]]
) -> None:
    """Cosine and decision tables, and the int8 verdict against the 0.5% bar."""
    print(f"\ncosine to the torch vector ({n} rows)")
    print(f"{'backend':<12} {'min':>8} {'p0.1':>8} {'p1':>8} {'median':>8} {'<0.99':>7}")
    for name, s in cosines.items():
        print(
            f"{name:<12} {s['min']:>8.5f} {s['p0.1']:>8.5f} {s['p1']:>8.5f} "
            f"{s['median']:>8.5f} {s['share_below_0.99']:>7.2%}"
        )
    print("\ndecisions (ALLOW/ESCALATE/BLOCK) that differ from torch")
    print(f"{'gateway on':<24} {'changed':>8} {'share':>7}  transitions")
    for name, d in decisions.items():
        print(f"{name:<24} {d['changed']:>8} {d['share_changed']:>7.2%}  {d['transitions']}")
    for name in ("onnx-int8", "onnx-int8 (torch index)"):
        if name in decisions:
            share = float(decisions[name]["share_changed"])  # type: ignore[arg-type]
            verdict = "holds" if share <= MAX_DECISION_CHANGE else "does NOT hold: keep int8 off"
            print(f"{name}: {share:.2%} changed vs the {MAX_DECISION_CHANGE:.1%} bar -> {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
