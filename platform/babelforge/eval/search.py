"""Exact inner-product top-k search with faiss (``IndexFlatIP``), on a GPU when faiss has one.

Queries are searched in batches. ``k`` larger than the corpus is fine (rows are padded), and
each query may name corpus rows to drop from its results (its own copy in a pooled corpus):
the index is asked for ``k + max(len(excluded))`` results and the excluded rows are removed.
Missing results are padded with index ``-1`` and score ``-inf``::

    >>> import numpy as np
    >>> corpus = np.eye(3, dtype=np.float32)
    >>> queries = np.array([[1.0, 0.5, 0.0]], dtype=np.float32)
    >>> result = search_inner_product(queries, corpus, k=5, exclude=[[0]])
    >>> result.indices.tolist(), result.scores.tolist()
    ([[1, 2, -1, -1, -1]], [[0.5, 0.0, -inf, -inf, -inf]])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Collection, Sequence

import faiss
import numpy as np

__all__ = ["SearchResult", "search_inner_product", "faiss_gpu_available"]

# faiss GPU brute-force search supports k up to this many results (larger k falls back to CPU).
GPU_MAX_K = 2048


@dataclass
class SearchResult:
    """``indices[i, j]``: corpus row of query ``i``'s ``j``-th best hit (``-1`` = none); ``scores`` alike."""

    scores: np.ndarray
    indices: np.ndarray


def faiss_gpu_available() -> bool:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


@lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    """One GPU memory pool per process (creating one costs a noticeable allocation)."""
    return faiss.StandardGpuResources()


def _flat_ip_index(corpus: np.ndarray, use_gpu: bool) -> Any:
    dim = corpus.shape[1]
    index = faiss.GpuIndexFlatIP(_gpu_resources(), dim) if use_gpu else faiss.IndexFlatIP(dim)
    index.add(corpus)
    return index


def search_inner_product(queries: np.ndarray, corpus: np.ndarray, k: int, *,
                         exclude: Sequence[Collection[int]] | None = None, batch_size: int = 4096,
                         use_gpu: bool | None = None) -> SearchResult:
    """Top-``k`` corpus rows by inner product for each query row (exact search).

    ``exclude[i]`` lists corpus rows never returned for query ``i``. ``use_gpu=None`` uses a GPU
    when faiss was built with GPU support and sees one.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries {queries.shape} and corpus {corpus.shape} must be 2-D with the same width")
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
    n_queries, n_docs = len(queries), len(corpus)
    scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or n_docs == 0:
        return SearchResult(scores, indices)
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    fetch = min(k + extra, n_docs)
    gpu = (faiss_gpu_available() if use_gpu is None else use_gpu) and fetch <= GPU_MAX_K
    index = _flat_ip_index(corpus, gpu)
    for start in range(0, n_queries, batch_size):
        batch_scores, batch_indices = index.search(queries[start:start + batch_size], fetch)
        if not extra:
            scores[start:start + len(batch_scores), :fetch] = batch_scores
            indices[start:start + len(batch_scores), :fetch] = batch_indices
            continue
        for offset in range(len(batch_indices)):
            row = start + offset
            found_scores, found = batch_scores[offset], batch_indices[offset]
            keep = ~np.isin(found, np.fromiter(exclude[row], dtype=np.int64, count=len(exclude[row])))
            found_scores, found = found_scores[keep], found[keep]
            found_scores, found = found_scores[:k], found[:k]
            scores[row, :len(found)] = found_scores
            indices[row, :len(found)] = found
    return SearchResult(scores, indices)
