"""The embedding model core: no Ray in here, so it runs (and is benchmarked) anywhere torch runs."""

from babelforge.models.embedder import BABELFORGE_CONFIG_NAME, Embedder, EmbedderConfig, inference_placement
from babelforge.models.pooling import POOLING_MODES, pool, truncate_embeddings, truncate_embeddings_np

__all__ = ["Embedder", "EmbedderConfig", "BABELFORGE_CONFIG_NAME", "inference_placement", "POOLING_MODES", "pool",
           "truncate_embeddings", "truncate_embeddings_np"]
