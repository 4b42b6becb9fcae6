"""Fit the shipped scoring model (router/scoring_model.json) from labelled data.

The model is a logistic regression over the router's evidence (nearest
exemplars of the shipped starter pack, prefilter hits) and a linear probe of
the embedding. It is fitted on the starter pack itself (each exemplar scored
without its own entry) plus the labelled JSONL files given with --data; only
the weights ship, never the texts. The defaults (`router.training.FitSettings`)
are the ones measured best leave-one-source-out (`tierguard eval --cross-source`).

    python scripts/fit_scorer.py --data ../shared/datasets/*.jsonl [--out FILE] [--cache FILE]

The starter pack's shipped vectors are reused; `--cache` keeps the labelled
texts' vectors too (`tierguard eval --cross-source` writes the same format).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embeddings_index.embedder import SentenceTransformerEmbedder  # noqa: E402
from embeddings_index.starter import load_precomputed_vectors, load_starter_pack  # noqa: E402
from embeddings_index.vector_cache import VectorCache  # noqa: E402
from embeddings_index.vocabulary import Label  # noqa: E402
from router.evaluation import read_labelled  # noqa: E402
from router.normalize import normalize  # noqa: E402
from router.prefilter import Prefilter  # noqa: E402
from router.scoring import DEFAULT_MODEL_PATH  # noqa: E402
from router.training import (  # noqa: E402
    FitSettings,
    TrainingExample,
    fit_scoring_model,
    pack_training,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="labelled JSONL files")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument(
        "--cache", type=Path, help="vector cache file (.npz) for the labelled texts"
    )
    defaults = FitSettings()
    parser.add_argument("--l2", type=float, default=defaults.l2, help="regularisation strength")
    parser.add_argument("--pack-share", type=float, default=defaults.pack_share,
                        help="weight of the starter pack within each label")  # fmt: skip
    parser.add_argument("--k", type=int, default=defaults.k, help="neighbours per text")
    parser.add_argument("--window-words", type=int, default=defaults.window_words,
                        help="also score long texts in windows of this many words (0: off)")  # fmt: skip
    parser.add_argument("--window-stride", type=int, default=defaults.window_stride)
    parser.add_argument("--no-embedding-head", action="store_true")
    args = parser.parse_args(argv)
    settings = FitSettings(
        k=args.k,
        temperature=defaults.temperature,
        embedding_head=not args.no_embedding_head,
        l2=args.l2,
        pack_share=args.pack_share,
        window_words=args.window_words,
        window_stride=args.window_stride,
    )

    embedder = SentenceTransformerEmbedder()
    pack = load_starter_pack()
    rows = [row for path in args.data for row in read_labelled(path)]
    cache = VectorCache(args.cache, embedder.model_id, known=load_precomputed_vectors())
    print(f"embedding {len(pack)} starter exemplars and {len(rows)} labelled texts", flush=True)
    pack_vectors = cache.vectors([normalize(e.text).text for e in pack], embedder.encode)
    row_vectors = cache.vectors([normalize(r.text).text for r in rows], embedder.encode)
    cache.save()

    index, pack_examples = pack_training(pack, pack_vectors, embedder.model_id)
    examples = pack_examples + [
        TrainingExample(r.text, r.label == Label.RISKY, r.file, row_vectors[i])
        for i, r in enumerate(rows)
    ]
    digest = hashlib.sha256("".join(sorted(p.name for p in args.data)).encode()).hexdigest()[:12]
    model = fit_scoring_model(
        examples,
        index,
        Prefilter.from_directory(),
        settings=settings,
        fitted_on=(
            f"scripts/fit_scorer.py: starter pack ({len(pack)} exemplars) + "
            f"{len(rows)} labelled texts from {len(args.data)} files (names sha256 {digest}); "
            f"l2={args.l2}, pack_share={args.pack_share}, k={args.k}, "
            f"windows {args.window_words}/{args.window_stride}, embedder {embedder.model_id}"
        ),
    )
    model.save(args.out)
    weights = dict(zip(model.feature_names, np.round(model.weights, 3), strict=True))
    print(f"wrote {args.out}: bias {model.bias:.3f}, weights {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
