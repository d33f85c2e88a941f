"""Faiss vector indexes for filtering, mining and evaluation: exact or IVF, on GPUs, sharded on disk.

Three layers, all inner product (embeddings are normalised, so scores are cosine similarities):

- :class:`VectorIndex`: one in-memory index over a matrix, exact (``IndexFlatIP``) or IVF
  (``IndexIVFFlat`` with ``nlist`` cells trained on a seeded sample, ``nprobe`` cells searched).
  When faiss sees GPUs the index is copied to all of them (``faiss.index_cpu_to_all_gpus``);
  inside a Ray actor that reserved one GPU that is the actor's GPU.
- :class:`VectorStore`: embeddings on disk (local path or any pyarrow URI) as shards:
  ``shards/<name>.npy`` (float32 ``[rows, dim]``, memory-mapped when local), ``shards/<name>.parquet``
  (one payload row per vector, e.g. the text) and ``_done/<name>.json`` written last, so a writer
  that was interrupted rewrites only its unfinished shards. Global row ``r`` is row ``r - offset``
  of the shard whose rows cover it (shards ordered by name).
- :class:`ShardedIndex`: searches each shard of a store separately and merges the per-shard top-k
  exactly by score (:func:`merge_top_k`), so a store larger than one node's memory can be searched
  one shard at a time from disk (``resident: false``); ``resident: true`` keeps every shard's
  index (and vectors) loaded for repeated searches.

Exact sharded search returns the same top-k as exact search over all vectors at once; results are
ordered by score, ties by global row. Missing results (``k`` beyond the rows, or IVF cells that
hold fewer than ``k`` vectors) are padded with row ``-1`` and score ``-inf``, as in
:func:`babelforge.eval.search.search_inner_product` (whose :class:`SearchResult` this module returns)::

    >>> import numpy as np
    >>> vectors = np.eye(4, dtype=np.float32)
    >>> index = VectorIndex(vectors, IndexConfig(kind="flat", use_gpu=False))
    >>> index.search(np.array([[0.0, 1.0, 0.5, 0.0]], dtype=np.float32), k=2).indices.tolist()
    [[1, 2]]
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import PositiveInt

from babelforge.config import StrictModel
from babelforge.data.shards import resolve_filesystem
from babelforge.eval.search import GPU_MAX_K, SearchResult, faiss_gpu_available

log = logging.getLogger(__name__)

__all__ = ["IndexConfig", "VectorIndex", "VectorStore", "StoreShard", "ShardedIndex", "SearchResult", "merge_top_k",
           "ivf_cells"]

# faiss' k-means wants at least this many training vectors per cell (it warns below).
_MIN_TRAINING_POINTS_PER_CELL = 39


class IndexConfig(StrictModel):
    """How pool embeddings are indexed and searched (the ``index`` section of filter and mine configs)."""

    kind: Literal["flat", "ivf"] = "flat"   # flat: exact; ivf: approximate, faster on large pools
    nlist: PositiveInt | None = None         # IVF cells per shard; null: 4 * sqrt(rows)
    nprobe: PositiveInt = 16                 # IVF cells searched per query (nprobe = nlist is exact)
    train_sample: PositiveInt = 100_000      # vectors per shard the IVF quantizer is trained on
    seed: int = 0                            # of the training sample
    use_gpu: bool | None = None              # null: a GPU index when faiss sees a GPU
    resident: bool = True                    # keep all shard indexes loaded; false: one shard at a time from disk
    query_batch: PositiveInt = 4096          # queries per faiss call


def ivf_cells(rows: int, nlist: int | None) -> int:
    """IVF cells for a shard of ``rows`` vectors: ``nlist`` (default ``4 * sqrt(rows)``), capped so
    every cell has enough training vectors."""
    wanted = nlist or max(1, round(4 * math.sqrt(rows)))
    return max(1, min(wanted, rows // _MIN_TRAINING_POINTS_PER_CELL))


def _as_matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array, got shape {vectors.shape}")
    return vectors


class VectorIndex:
    """One faiss inner-product index over ``vectors`` (rows are numbered 0..n-1)."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig | None = None,
                 trained: Any | None = None) -> None:
        """Build from ``vectors``; ``trained`` is an already built CPU faiss index to use instead."""
        self.config = config or IndexConfig()
        cpu_index = trained if trained is not None else self.build_cpu_index(vectors, self.config)
        self.ntotal = int(cpu_index.ntotal)
        self.dim = int(cpu_index.d)
        self.on_gpu = faiss_gpu_available() if self.config.use_gpu is None else self.config.use_gpu
        if self.config.kind == "ivf":
            faiss.extract_index_ivf(cpu_index).nprobe = self.config.nprobe
        self._index = faiss.index_cpu_to_all_gpus(cpu_index) if self.on_gpu else cpu_index
        if self.on_gpu and self.config.kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", self.config.nprobe)

    @staticmethod
    def build_cpu_index(vectors: np.ndarray, config: IndexConfig) -> Any:
        """A CPU faiss index over ``vectors``: ``IndexFlatIP``, or ``IndexIVFFlat`` trained on a sample."""
        vectors = _as_matrix(vectors, "vectors")
        rows, dim = vectors.shape
        if config.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = ivf_cells(rows, config.nlist)
            if config.nlist and nlist < config.nlist:
                log.info("IVF: %d cells instead of %d for a shard of %d vectors", nlist, config.nlist, rows)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = vectors
            if rows > config.train_sample:
                chosen = np.random.default_rng(config.seed).choice(rows, config.train_sample, replace=False)
                sample = vectors[np.sort(chosen)]
            index.train(np.ascontiguousarray(sample))
        if rows:
            index.add(vectors)
        return index

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` rows per query, best first (padded with ``-1`` / ``-inf``)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = _as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have width {queries.shape[1]}, the index {self.dim}")
        if self.on_gpu and k > GPU_MAX_K:
            raise ValueError(f"k={k}: faiss GPU indexes return at most {GPU_MAX_K} results; set index.use_gpu=false")
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        indices = np.full((len(queries), k), -1, dtype=np.int64)
        if self.ntotal == 0:
            return SearchResult(scores, indices)
        fetch = min(k, self.ntotal)
        for start in range(0, len(queries), self.config.query_batch):
            stop = start + self.config.query_batch
            scores[start:stop, :fetch], indices[start:stop, :fetch] = self._index.search(queries[start:stop], fetch)
        scores[indices < 0] = -np.inf
        return SearchResult(scores, indices)


def merge_top_k(partials: list[SearchResult], k: int) -> SearchResult:
    """Exact top-``k`` of several results over disjoint rows (global row numbers), best first.

    Ties are ordered by row, so the merge is independent of how the rows were split; padding
    (row ``-1``) goes last.
    """
    if not partials:
        raise ValueError("nothing to merge")
    scores = np.concatenate([p.scores for p in partials], axis=1)
    indices = np.concatenate([p.indices for p in partials], axis=1)
    tie_break = np.where(indices < 0, np.iinfo(np.int64).max, indices)
    order = np.lexsort((tie_break, -scores), axis=1)[:, :k]
    merged_scores = np.take_along_axis(scores, order, axis=1)
    merged_indices = np.take_along_axis(indices, order, axis=1)
    if merged_scores.shape[1] < k:  # fewer candidates than k in total
        pad = k - merged_scores.shape[1]
        merged_scores = np.pad(merged_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        merged_indices = np.pad(merged_indices, ((0, 0), (0, pad)), constant_values=-1)
    return SearchResult(merged_scores, merged_indices)


@dataclass(frozen=True)
class StoreShard:
    """A committed shard of a :class:`VectorStore`: its rows are global rows ``offset .. offset + rows - 1``."""

    name: str
    rows: int
    dim: int
    offset: int


class VectorStore:
    """Embedding shards on disk with a row payload (see the module docstring for the layout)."""

    METADATA = "store.json"

    def __init__(self, root: str) -> None:
        self.uri = root
        self.fs, self.root = resolve_filesystem(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        for sub in ("shards", "_done"):
            self.fs.create_dir(posixpath.join(self.root, sub), recursive=True)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def has_file(self, *parts: str) -> bool:
        """Whether the file at ``parts`` (relative to the store root) exists."""
        return self.fs.get_file_info(self._path(*parts)).type == pafs.FileType.File

    def write_file(self, data: bytes, *parts: str) -> None:
        """Write a file under the store root atomically (temporary file, then rename)."""
        path = self._path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)
        self.fs.move(tmp, path)

    def read_file(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self._path(*parts)) as f:
            return f.read()

    # -------------------------------------------------------------------------------- writing
    def write_shard(self, name: str, vectors: np.ndarray, rows: pa.Table) -> StoreShard:
        """Write (or overwrite) shard ``name``; it counts as committed once its done marker exists."""
        if "/" in name or name.startswith((".", "_")):
            raise ValueError(f"invalid shard name {name!r}")
        vectors = _as_matrix(vectors, f"shard {name} vectors")
        if len(vectors) != rows.num_rows:
            raise ValueError(f"shard {name}: {len(vectors)} vectors but {rows.num_rows} payload rows")
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        self.write_file(buffer.getvalue(), "shards", f"{name}.npy")
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink)
        self.write_file(sink.getvalue().to_pybytes(), "shards", f"{name}.parquet")
        marker = {"name": name, "rows": len(vectors), "dim": int(vectors.shape[1])}
        self.write_file(json.dumps(marker).encode(), "_done", f"{name}.json")
        return StoreShard(name, len(vectors), int(vectors.shape[1]), offset=-1)

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        self.write_file(json.dumps(metadata, indent=2, ensure_ascii=False).encode(), self.METADATA)

    # -------------------------------------------------------------------------------- reading
    def read_metadata(self) -> dict[str, Any] | None:
        return json.loads(self.read_file(self.METADATA)) if self.has_file(self.METADATA) else None

    def is_done(self, name: str) -> bool:
        return self.has_file("_done", f"{name}.json")

    def shards(self) -> list[StoreShard]:
        """Committed shards ordered by name, with their global row offsets."""
        selector = pafs.FileSelector(self._path("_done"), allow_not_found=True)
        markers = sorted(i.path for i in self.fs.get_file_info(selector)
                         if i.type == pafs.FileType.File and i.path.endswith(".json"))
        shards, offset = [], 0
        for path in markers:
            with self.fs.open_input_stream(path) as f:
                marker = json.loads(f.read())
            shards.append(StoreShard(marker["name"], int(marker["rows"]), int(marker["dim"]), offset))
            offset += int(marker["rows"])
        return shards

    def load_vectors(self, name: str) -> np.ndarray:
        """A shard's vectors: memory-mapped (read-only) for local stores, read into memory otherwise."""
        path = self._path("shards", f"{name}.npy")
        if self.local:
            return np.load(path, mmap_mode="r")
        return np.load(io.BytesIO(self.read_file("shards", f"{name}.npy")))

    def read_rows(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self._path("shards", f"{name}.parquet"), columns=columns, filesystem=self.fs)

    def read_index(self, filename: str) -> Any | None:
        """A faiss index saved with :meth:`write_index`, or None."""
        if not self.has_file("index", filename):
            return None
        return faiss.deserialize_index(np.frombuffer(self.read_file("index", filename), dtype=np.uint8))

    def write_index(self, filename: str, index: Any) -> None:
        self.write_file(faiss.serialize_index(index).tobytes(), "index", filename)


class ShardedIndex:
    """Searches every committed shard of a :class:`VectorStore`; rows are global rows.

    IVF shard indexes are trained once and saved in the store (``index/<shard>-ivf...faiss``), so
    other actors and later runs load them instead of retraining.
    """

    def __init__(self, store: VectorStore, config: IndexConfig | None = None) -> None:
        self.store = store
        self.config = config or IndexConfig()
        self.shards = store.shards()
        if not self.shards:
            raise ValueError(f"vector store {store.uri} has no committed shard")
        dims = {s.dim for s in self.shards}
        if len(dims) != 1:
            raise ValueError(f"vector store {store.uri} mixes dimensions {sorted(dims)}")
        self.dim = dims.pop()
        self.rows = self.shards[-1].offset + self.shards[-1].rows
        self._offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        self._vectors: list[np.ndarray] | None = None
        self._indexes: list[VectorIndex] | None = None
        if self.config.resident:
            self._vectors = [store.load_vectors(s.name) for s in self.shards]
            self._indexes = [self._shard_index(s, v) for s, v in zip(self.shards, self._vectors)]

    def _shard_index(self, shard: StoreShard, vectors: np.ndarray) -> VectorIndex:
        if self.config.kind == "flat":
            return VectorIndex(vectors, self.config)
        c = self.config
        filename = f"{shard.name}-ivf{ivf_cells(shard.rows, c.nlist)}-t{c.train_sample}-s{c.seed}.faiss"
        trained = self.store.read_index(filename)
        if trained is None:
            trained = VectorIndex.build_cpu_index(vectors, c)
            self.store.write_index(filename, trained)
        return VectorIndex(vectors, c, trained=trained)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` global rows per query over all shards, best first."""
        partials = []
        for i, shard in enumerate(self.shards):
            if self._indexes is not None:
                index = self._indexes[i]
            else:  # one shard at a time: only this shard's vectors and index are in memory
                index = self._shard_index(shard, self.store.load_vectors(shard.name))
            result = index.search(queries, k)
            result.indices[result.indices >= 0] += shard.offset
            partials.append(result)
        return merge_top_k(partials, k)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, row within that shard) of each global row."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows must be within 0..{self.rows - 1}")
        shard_pos = np.searchsorted(self._offsets, rows, side="right") - 1
        return shard_pos, rows - self._offsets[shard_pos]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of global ``rows`` (any shape of row array; a trailing ``dim`` axis is added)."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        shard_pos, local = self.locate(flat)
        for pos in np.unique(shard_pos):
            mask = shard_pos == pos
            if self._vectors is not None:
                vectors = self._vectors[pos]
            else:
                vectors = self.store.load_vectors(self.shards[pos].name)
            out[mask] = vectors[local[mask]]
        return out.reshape(*rows.shape, self.dim)
