"""Index snapshots on disk: a restart loads the built index instead of rebuilding it.

Building an approximate index over a million exemplars takes minutes (k-means
training, then assigning every vector), so the manager saves what it built and
loads it at start when it still describes the store: same index version, same
embedding model, same build options. Anything else (no snapshot, a mismatch, a
damaged file) means rebuild from the store and save again.

Layout of the snapshot directory (`<data_dir>/index/` by convention)::

    manifest.json            what is saved: version, model id, files (the commit point)
    base-<token>.faiss       the FAISS structure (`faiss.write_index`), written once per build
    base-<token>.json        its exemplar ids, labels and categories, by position
    state-<version>.npz      changes since the build: added vectors, removed positions
    state-<version>.json     the added exemplars' ids, labels and categories

Every file is written under a temporary name, flushed to disk and renamed; the
manifest is replaced last, so a crash at any point leaves the previous
snapshot (or none) readable, never a torn one. A change after the build
rewrites only the small state files: the base is written again only when a
rebuild made a new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from embeddings_index.faiss_index import ExemplarIndex, IndexOptions, IndexState

__all__ = ["MANIFEST", "load_snapshot", "save_snapshot"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = 1


def save_snapshot(directory: Path, index: ExemplarIndex) -> None:
    """Save `index` under `directory` atomically (replacing the snapshot there)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = index.state
    base = f"base-{state.base_token}"
    if not (directory / f"{base}.faiss").exists() or not (directory / f"{base}.json").exists():
        with _atomic(directory / f"{base}.faiss", "wb") as tmp:
            faiss.write_index(state.base, tmp.name)
        with _atomic(directory / f"{base}.json", "w") as out:
            json.dump(_labels(state.base_ids, state.base_risky, state.base_categories), out)
    stem = f"state-{state.version}"
    with _atomic(directory / f"{stem}.npz", "wb") as out:
        np.savez(out, delta_vectors=state.delta_vectors, dead=state.dead)
    with _atomic(directory / f"{stem}.json", "w") as out:
        json.dump(_labels(state.delta_ids, state.delta_risky, state.delta_categories), out)
    manifest = {
        "format": _FORMAT,
        "version": state.version,
        "model_id": state.model_id,
        "dim": state.dim,
        "build": index.options.build_key(len(state.base_ids)),
        "base": base,
        "base_size": len(state.base_ids),
        "state": stem,
        "live": len(index),
    }
    with _atomic(directory / MANIFEST, "w") as out:
        json.dump(manifest, out, indent=1)
    _fsync_directory(directory)
    _remove_unreferenced(directory, keep={base, stem})


def load_snapshot(
    directory: Path, *, version: int, model_id: str, options: IndexOptions | None = None
) -> ExemplarIndex | None:
    """The saved index if it matches `version`, `model_id` and `options`; else None (rebuild)."""
    options = options or IndexOptions()
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        stale = _why_stale(manifest, version=version, model_id=model_id, options=options)
        if stale:
            log.info("index snapshot in %s not used: %s", directory, stale)
            return None
        index = ExemplarIndex.from_state(_read_state(Path(directory), manifest), options)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("index snapshot in %s is unreadable, rebuilding: %s", directory, exc)
        return None
    if len(index) != manifest["live"]:
        log.warning("index snapshot in %s is inconsistent, rebuilding", directory)
        return None
    return index


def _why_stale(
    manifest: dict[str, Any], *, version: int, model_id: str, options: IndexOptions
) -> str:
    if manifest.get("format") != _FORMAT:
        return f"format {manifest.get('format')!r}, expected {_FORMAT}"
    if manifest["model_id"] != model_id:
        return f"made with model {manifest['model_id']!r}, not {model_id!r}"
    if manifest["version"] != version:
        return f"index version {manifest['version']}, the store is at {version}"
    if manifest["build"] != options.build_key(manifest["base_size"]):
        return f"built as {manifest['build']}, options now ask for a different structure"
    return ""


def _read_state(directory: Path, manifest: dict[str, Any]) -> IndexState:
    base = faiss.read_index(str(directory / f"{manifest['base']}.faiss"))
    base_ids, base_risky, base_categories = _unlabels(directory / f"{manifest['base']}.json")
    with np.load(directory / f"{manifest['state']}.npz") as arrays:
        delta_vectors = np.ascontiguousarray(arrays["delta_vectors"], dtype=np.float32)
        dead = arrays["dead"].astype(np.int64)
    delta_ids, delta_risky, delta_categories = _unlabels(directory / f"{manifest['state']}.json")
    if base.ntotal != len(base_ids) or len(delta_vectors) != len(delta_ids):
        raise ValueError("the FAISS structure and its labels disagree")
    if manifest["dim"] and base.d != manifest["dim"]:
        raise ValueError(f"the FAISS structure has dimension {base.d}, not {manifest['dim']}")
    return IndexState(
        version=manifest["version"],
        model_id=manifest["model_id"],
        dim=manifest["dim"],
        structure=manifest["build"]["structure"],
        base_token=manifest["base"].removeprefix("base-"),
        base=base,
        base_ids=base_ids,
        base_risky=base_risky,
        base_categories=base_categories,
        delta_vectors=delta_vectors.reshape(-1, base.d),
        delta_ids=delta_ids,
        delta_risky=delta_risky,
        delta_categories=delta_categories,
        dead=dead,
    )


def _labels(ids: list[str], risky: np.ndarray, categories: list[str]) -> dict[str, Any]:
    return {"ids": ids, "risky": risky.astype(np.uint8).tolist(), "categories": categories}


def _unlabels(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    ids, risky, categories = raw["ids"], np.array(raw["risky"], dtype=bool), raw["categories"]
    if not len(ids) == len(risky) == len(categories):
        raise ValueError(f"{path.name}: ids, labels and categories differ in length")
    return ids, risky, categories


@contextmanager
def _atomic(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A file that appears at `path`, complete and on disk, only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_unreferenced(directory: Path, *, keep: set[str]) -> None:
    for path in directory.iterdir():
        stem = path.name.split(".", 1)[0]
        if stem.startswith(("base-", "state-")) and stem not in keep:
            path.unlink(missing_ok=True)
