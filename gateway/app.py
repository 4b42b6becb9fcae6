"""The gateway's runtime parts, wired once at start and shared by every request.

`Gateway.create` loads the embedding model (unless one is passed in, as tests
do to load it once per session), opens the exemplar store under the data
directory, brings in the starter pack and builds the index. It knows nothing
of gRPC: the servicers adapt it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from embeddings_index.batching import BatchingConfig, MicroBatcher
from embeddings_index.embedder import Embedder, SentenceTransformerEmbedder
from embeddings_index.manager import IndexManager
from gateway.config import Config, Policy
from gateway.errors import PolicyNotFound
from router.normalize import normalized_text
from router.prefilter import Prefilter
from router.router import Router
from router.scoring import DEFAULT_MODEL_PATH, ScoringModel

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Config, index, router and batcher of one running gateway."""

    config: Config
    embedder: Embedder
    index: IndexManager
    router: Router
    batcher: MicroBatcher

    @classmethod
    def create(cls, config: Config, *, embedder: Embedder | None = None) -> Gateway:
        """Build every part; slow (loads the model, may embed the starter pack)."""
        if embedder is None:
            embedder = SentenceTransformerEmbedder(config.embedding.model_path)
        index = IndexManager.open(config.data_dir, embedder, prepare=normalized_text)
        router = Router(
            prefilter=Prefilter.from_directory(),
            scoring=ScoringModel.load(config.scoring_model or DEFAULT_MODEL_PATH),
            index=lambda: index.index,
        )
        batcher = MicroBatcher(
            embedder,
            BatchingConfig(
                max_batch=config.embedding.max_batch, max_wait_ms=config.embedding.max_wait_ms
            ),
        )
        log.info(
            "gateway ready: %d exemplars (index version %d), policies %s",
            len(index.index),
            index.index.version,
            sorted(config.policies),
        )
        return cls(config=config, embedder=embedder, index=index, router=router, batcher=batcher)

    def resolve_policy(self, *names: str) -> Policy:
        """The first non-empty name's policy, else the default policy.

        Raises:
            PolicyNotFound: the first non-empty name is not a policy.
        """
        name = next((n for n in names if n), self.config.default_policy)
        policy = self.config.policy(name)
        if policy is None:
            raise PolicyNotFound(name, list(self.config.policies))
        return policy

    async def aclose(self) -> None:
        """Release the batcher's thread and the store."""
        await self.batcher.aclose()
        self.index.store.close()
