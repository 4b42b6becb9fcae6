"""The shipped sentence-transformers model on ONNX Runtime: the same vectors, less CPU.

Why: on this project's 2-core target, all-MiniLM-L6-v2 through torch serves
about 30-40 prompts/s one at a time; the same graph on ONNX Runtime is about
twice as fast in fp32, and int8 adds about a fifth on top. Tier 1's cost is this
model, so it sets the gateway's ceiling.

The model is exported from the local sentence-transformers directory, offline,
the first time it is needed (torch traces transformer + mean pooling + L2
normalisation into one graph), and cached as an `.onnx` file with a JSON
sidecar holding a fingerprint of the source files; a later start loads the
cache, and a changed model (or export recipe) is exported again. int8
(`quantize=True`: blockwise int8 weights on MatMulNBits) is derived from the
fp32 export and cached the same way.

Tokenisation is the model directory's own fast tokenizer, truncated to the
model's `max_seq_length` word pieces as sentence-transformers does. Texts are
sorted by token count and cut into batches under a token budget, so one long
prompt does not make every short one in its batch pay for padding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embeddings_index.embedder import (
    EmbedderError,
    default_model_path,
    model_name,
    offline_model_environment,
    sentence_transformers_model_id,
)

__all__ = ["EXPORT_RECIPE", "INT8_ID_SUFFIX", "OnnxEmbedder", "model_fingerprint"]

log = logging.getLogger(__name__)

# Bump when the exported graph or the quantisation settings change: caches made
# by an older recipe carry a different fingerprint and are exported again.
EXPORT_RECIPE = 2
# Appended to the model id of int8 vectors: they are not the fp32 model's vectors.
INT8_ID_SUFFIX = "+onnx-int8"
_OPSET = 17
# Files whose content decides the exported graph (the tokenizer is read at load, not baked in).
_GRAPH_FILES = (
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "modules.json",
    "sentence_bert_config.json",
)
_INSTALL_ORT = "the ONNX embedding backend needs onnxruntime: pip install onnxruntime"
_INSTALL_EXPORT = (
    "exporting the model to ONNX needs torch, transformers and onnx: pip install onnx "
    "(torch and transformers come with sentence-transformers)"
)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise EmbedderError(_INSTALL_ORT) from exc
    return onnxruntime


class _Layout:
    """Where the parts of a sentence-transformers directory live, checked for what we support."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        modules_file = model_dir / "modules.json"
        modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        transformer = kinds.get("Transformer")
        self.transformer_dir = model_dir / transformer["path"] if transformer else model_dir
        if not (self.transformer_dir / "config.json").is_file():
            raise EmbedderError(
                f"no model at {model_dir}: expected a sentence-transformers directory"
            )
        self.pooling_file: Path | None = None
        self.pooling_config: dict[str, Any] = {"pooling_mode_mean_tokens": True}
        if "Pooling" in kinds:
            self.pooling_file = model_dir / kinds["Pooling"]["path"] / "config.json"
            self.pooling_config = json.loads(self.pooling_file.read_text())
        modes = {k for k, v in self.pooling_config.items() if k.startswith("pooling_mode") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise EmbedderError(
                f"model at {model_dir} pools with {sorted(modes)}; the ONNX backend supports "
                "mean pooling only (use the sentence-transformers backend)"
            )
        unsupported = set(kinds) - {"Transformer", "Pooling", "Normalize"}
        if unsupported:
            raise EmbedderError(
                f"model at {model_dir} has modules {sorted(unsupported)} the ONNX backend "
                "does not reproduce (use the sentence-transformers backend)"
            )
        self.tokenizer_file = self.transformer_dir / "tokenizer.json"
        if not self.tokenizer_file.is_file():
            raise EmbedderError(f"model at {model_dir} has no fast tokenizer (tokenizer.json)")
        config = json.loads((self.transformer_dir / "config.json").read_text())
        self.hidden_size = int(config["hidden_size"])
        st_config_file = self.transformer_dir / "sentence_bert_config.json"
        st_config = json.loads(st_config_file.read_text()) if st_config_file.is_file() else {}
        limit = int(config.get("max_position_embeddings", 512))
        self.max_seq_length = min(int(st_config.get("max_seq_length") or limit), limit)

    def graph_files(self) -> list[Path]:
        """The files the fp32 graph is made from."""
        files = [self.transformer_dir / name for name in _GRAPH_FILES]
        files.append(self.model_dir / "modules.json")
        if self.pooling_file is not None:
            files.append(self.pooling_file)
        return sorted({f for f in files if f.is_file()})


def model_fingerprint(model_dir: Path | None = None) -> str:
    """A digest of what the ONNX graph is made from: source files and the export recipe.

    A cached export whose sidecar carries another fingerprint is stale.
    """
    layout = _Layout(Path(model_dir) if model_dir else default_model_path())
    return _fingerprint(layout)


def _fingerprint(layout: _Layout) -> str:
    digest = hashlib.sha256(f"tierguard-onnx-export/{EXPORT_RECIPE}/opset{_OPSET}\0".encode())
    for path in layout.graph_files():
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _derived_fingerprint(parent: str, **settings: object) -> str:
    payload = json.dumps({"parent": parent, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OnnxEmbedder:
    """all-MiniLM-L6-v2 (or another mean-pooled sentence-transformers model) on ONNX Runtime.

    Args:
        cache_dir: Where exported `.onnx` files and their sidecars live (the
            gateway passes `<data_dir>/models/`); created if missing.
        model_path: A sentence-transformers directory; None for the packaged model.
        quantize: Use int8 dynamic quantisation (faster; vectors drift a little,
            see `benchmarks/agreement.py` before turning it on).
        token_budget: Most word pieces (batch rows x padded length) in one model
            call. Throughput per text stops growing well below this on 2 cores,
            and bigger calls only add latency.
        max_batch: Most texts in one model call.
        threads: ONNX Runtime intra-op threads; None uses every core this
            process may run on.
        spin: Let idle ONNX Runtime threads spin for new work. Off by default:
            in a server the spinning steals the cores that gRPC and the event
            loop need between batches.
        model_id: Override the reported model id. Default: fp32 reports the same
            id as `SentenceTransformerEmbedder` for the same directory (same
            vectors to float rounding, so stored exemplar vectors stay valid);
            int8 reports that id plus "+onnx-int8", because its vectors drift
            (cosine to torch 0.998 or more) and the index must then be re-embedded
            with it rather than mixed.
    """

    def __init__(
        self,
        cache_dir: Path,
        model_path: Path | None = None,
        *,
        quantize: bool = False,
        token_budget: int = 1024,
        max_batch: int = 64,
        threads: int | None = None,
        spin: bool = False,
        model_id: str | None = None,
    ) -> None:
        offline_model_environment()
        if token_budget < 1 or max_batch < 1:
            raise ValueError("token_budget and max_batch must be positive")
        ort = _import_onnxruntime()
        self._layout = _Layout(Path(model_path) if model_path else default_model_path())
        self._cache_dir = Path(cache_dir)
        self._quantized = quantize
        self._token_budget = token_budget
        self._max_batch = max_batch
        self._model_id = model_id or sentence_transformers_model_id(self._layout.model_dir) + (
            INT8_ID_SUFFIX if quantize else ""
        )
        self._model_file = self._ensure_cached()
        try:
            self._session = self._open_session(ort, threads or _cpu_count(), spin)
        except EmbedderError as exc:  # a damaged cache file: export once more, then give up
            log.warning("%s; exporting again", exc)
            _sidecar(self._model_file).unlink(missing_ok=True)
            self._model_file = self._ensure_cached()
            self._session = self._open_session(ort, threads or _cpu_count(), spin)
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._tokenizer = self._load_tokenizer()
        self._dim = self._layout.hidden_size
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_seq_length(self) -> int:
        """Word pieces the model reads; the rest of a longer text is cut off."""
        return self._layout.max_seq_length

    @property
    def quantized(self) -> bool:
        """Whether the int8 graph is in use."""
        return self._quantized

    @property
    def model_file(self) -> Path:
        """The cached `.onnx` file this embedder runs."""
        return self._model_file

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` into unit rows, in batches of similar length under the token budget."""
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        order = np.argsort(lengths, kind="stable")
        with self._lock:
            for rows in self._batches(order, lengths):
                width = int(lengths[rows[-1]])
                ids = np.zeros((len(rows), width), dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for r, i in enumerate(rows):
                    n = int(lengths[i])
                    ids[r, :n] = encodings[i].ids
                    mask[r, :n] = 1
                feed = {"input_ids": ids, "attention_mask": mask}
                if "token_type_ids" in self._input_names:
                    feed["token_type_ids"] = np.zeros_like(ids)
                out[rows] = self._session.run(None, feed)[0]
        return out

    def _batches(self, order: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive runs of `order` (ascending length) that fit the budget and max batch."""
        start, n = 0, len(order)
        while start < n:
            end = start + 1
            while (
                end < n
                and end - start < self._max_batch
                and (end - start + 1) * int(lengths[order[end]]) <= self._token_budget
            ):
                end += 1
            yield order[start:end]
            start = end

    # -- the cache ------------------------------------------------------------------------

    def _ensure_cached(self) -> Path:
        """The path of an up-to-date export (exporting and quantising if needed)."""
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        stem = _stem(self._layout.model_dir)
        fp32 = self._cache_dir / f"{stem}.onnx"
        fingerprint = _fingerprint(self._layout)
        with _file_lock(self._cache_dir / f"{stem}.lock"):
            if not _is_current(fp32, fingerprint):
                _export_in_child(self._layout, fp32, fingerprint)
            if not self._quantized:
                return fp32
            int8 = self._cache_dir / f"{stem}-int8.onnx"
            int8_fingerprint = _derived_fingerprint(fingerprint, **_QUANT_SETTINGS)
            if not _is_current(int8, int8_fingerprint):
                _quantize(fp32, int8, int8_fingerprint)
            return int8

    def _open_session(self, ort: Any, threads: int, spin: bool) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(
                str(self._model_file), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # a truncated or foreign file: say where it is
            raise EmbedderError(f"ONNX Runtime cannot load {self._model_file}: {exc}") from exc

    def _load_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self._layout.tokenizer_file))
        # tokenizer.json ships with fixed padding to 128 and truncation at 128; what
        # sentence-transformers does is truncate to max_seq_length and pad per batch.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self._layout.max_seq_length)
        return tokenizer


# -- export and quantisation ------------------------------------------------------------

# Weights int8 in blocks of 16 along the input dimension (symmetric, one scale per
# block), run by ONNX Runtime's MatMulNBits with accuracy_level 4: activations are
# quantised to int8 per row and per block of 16 too, on the fly. The classic
# quantize_dynamic recipe (one uint8 scale for a whole activation tensor) is about
# 2.8x faster but moved 2.4% of routing decisions on the labelled datasets; this one
# keeps cosine to torch >= 0.998 and moved 0.41% (benchmarks/agreement.py), for about
# 1.2x the fp32 speed on 2 cores. Attention scores (activation x activation) stay fp32.
_QUANT_SETTINGS: dict[str, object] = {
    "recipe": EXPORT_RECIPE,
    "op": "MatMulNBits",
    "bits": 8,
    "block_size": 16,
    "symmetric": True,
    "accuracy_level": 4,
}


def _stem(model_dir: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name(model_dir))


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _is_current(path: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    return path.is_file() and meta.get("fingerprint") == fingerprint


def _commit(tmp: Path, path: Path, meta: dict[str, object]) -> None:
    """Move a finished file into place, then write its sidecar (the sidecar marks it valid)."""
    _sidecar(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    sidecar_tmp = path.with_suffix(".json.tmp")
    sidecar_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(sidecar_tmp, _sidecar(path))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise exports between processes that share a cache directory."""
    with path.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: a lone process is the common case
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export_in_child(layout: _Layout, target: Path, fingerprint: str) -> None:
    """`_export` in a child process: torch (hundreds of MB) never stays in the server."""
    command = [
        sys.executable,
        "-m",
        "embeddings_index.onnx_embedder",
        str(layout.model_dir),
        str(target),
        fingerprint,
    ]
    log.info("exporting %s to ONNX at %s (once, in a child process)", layout.model_dir, target)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise EmbedderError(
            f"exporting {layout.model_dir} to ONNX failed (exit {done.returncode}): "
            + " | ".join(tail)
        )


def _export(layout: _Layout, target: Path, fingerprint: str) -> None:
    """Trace transformer + mean pooling + L2 normalisation into one ONNX graph."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; fail with a clear message
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise EmbedderError(_INSTALL_EXPORT) from exc
    log.info("exporting %s to ONNX at %s (once)", layout.model_dir, target)
    start = time.perf_counter()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    # Two rows, one of them padded, so the trace keeps the mask arithmetic general.
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2054, 2003, 1037, 3231, 102]])
    mask = (ids != 0).to(torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    tmp = target.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable here
        # Eager attention traces to plain MatMul/Softmax, which ONNX Runtime fuses itself.
        model = AutoModel.from_pretrained(
            str(layout.transformer_dir), local_files_only=True, attn_implementation="eager"
        ).eval()
        torch.onnx.export(
            SentenceEncoder(model),
            (ids, mask, torch.zeros_like(ids)),
            str(tmp),
            dynamo=False,
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
            opset_version=_OPSET,
            do_constant_folding=True,
        )
    meta = {
        "fingerprint": fingerprint,
        "source": str(layout.model_dir),
        "recipe": EXPORT_RECIPE,
        "opset": _OPSET,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _commit(tmp, target, meta)
    log.info("exported %s in %.1f s", target.name, time.perf_counter() - start)


def _quantize(source: Path, target: Path, fingerprint: str) -> None:
    """Blockwise int8 weights for every MatMul with a constant weight (see `_QUANT_SETTINGS`)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise EmbedderError(f"{_INSTALL_ORT} onnx") from exc
    log.info("quantising %s to int8 at %s (once)", source.name, target)
    block = int(_QUANT_SETTINGS["block_size"])  # type: ignore[call-overload]
    model = onnx.load(str(source))
    weights = {init.name: init for init in model.graph.initializer}
    nodes, replaced, added = [], set(), []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)  # [K, N]
        k, n = w.shape
        blocks = -(-k // block)
        padded = np.zeros((n, blocks * block), dtype=np.float32)
        padded[:, :k] = w.T
        grouped = padded.reshape(n, blocks, block)
        scales = np.abs(grouped).max(axis=2) / 127.0
        scales[scales == 0] = 1.0
        # Symmetric: stored as uint8 around MatMulNBits' default zero point of 128.
        codes = np.clip(np.rint(grouped / scales[..., None]), -127, 127) + 128
        name = node.input[1]
        added += [
            numpy_helper.from_array(codes.astype(np.uint8), f"{name}_q8"),
            numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}_q8_scales"),
        ]
        replaced.add(name)
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{name}_q8", f"{name}_q8_scales"],
                list(node.output),
                name=f"{node.name}_q8",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=_QUANT_SETTINGS["bits"],
                block_size=block,
                accuracy_level=_QUANT_SETTINGS["accuracy_level"],
            )
        )
    kept = [init for init in model.graph.initializer if init.name not in replaced]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *added])
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tmp = target.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    meta = {
        "fingerprint": fingerprint,
        "source": str(source),
        **_QUANT_SETTINGS,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _commit(tmp, target, meta)


def _main(argv: Sequence[str]) -> int:
    """Child-process entry point of `_export_in_child`: MODEL_DIR TARGET FINGERPRINT."""
    model_dir, target, fingerprint = argv
    logging.basicConfig(level=logging.WARNING)
    _export(_Layout(Path(model_dir)), Path(target), fingerprint)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
