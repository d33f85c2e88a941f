"""The candidate pool: the unique texts queries are ranked against, encoded once by the teacher.

Pool = the positives and hard negatives of all pairs plus, optionally, corpus texts (ingest
output), each text once. It is a :class:`~babelforge.index.VectorStore` whose payload rows are
``text_key`` (int64: the first 8 bytes of the BLAKE2b hash of the UTF-8 text) and ``text``; a
pair finds its positive's pool row through the key (:class:`PoolLookup`). Two different texts
with the same 64-bit key would share a row; for a pool of ``n`` texts that happens with
probability about ``n**2 / 2**65`` (0.03 % for 100 million texts).

Building (:func:`build_pool`) streams and never holds more than one shard of texts:

1. *partition* (driver): every candidate text goes to bucket ``key mod B`` under
   ``_staging/`` with ``B = ceil(candidates / rows_per_shard)``, so copies of a text always share
   a bucket;
2. *encode* (per bucket): drop repeated keys (first occurrence wins), embed with the teacher's
   passage prompt through a Ray Data actor pool (:func:`babelforge.encoding.embed_dataset`: one
   actor per GPU, CPU actors otherwise) and commit the bucket as pool shard ``pool-<bucket>``.
   A rerun skips committed shards, so an interrupted build resumes without re-encoding.

``store.json`` records the teacher settings the pool was encoded with and the counts::

    >>> store = build_pool("/tmp/run/filter/_pool", ["/tmp/run/filter/_pairs/pairs-00000.parquet"],
    ...                    teacher=teacher_cfg, rows_per_shard=250_000)              # doctest: +SKIP
    >>> PoolLookup(store).rows_of(["Das ist ein Satz."])                               # doctest: +SKIP
    array([17])
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from babelforge.data.shards import list_parquet_files, resolve_filesystem
from babelforge.errors import ConfigError, DataFormatError
from babelforge.index import VectorStore

log = logging.getLogger(__name__)

__all__ = ["text_keys", "build_pool", "PoolLookup", "PoolTexts", "POOL_ROW_SCHEMA", "open_pool"]

POOL_ROW_SCHEMA = pa.schema([pa.field("text_key", pa.int64(), nullable=False),
                             pa.field("text", pa.string(), nullable=False)])
_READ_BATCH = 8192


def text_keys(texts: Iterable[str]) -> np.ndarray:
    """64-bit keys of texts (BLAKE2b of the UTF-8 bytes), as int64."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little",
                                       signed=True) for t in texts), dtype=np.int64)


def _texts_of(path: str, fs: Any, columns: Sequence[str]) -> Iterator[list[str]]:
    """Non-empty texts of ``columns`` of a parquet file, batch by batch."""
    parquet = pq.ParquetFile(path, filesystem=fs)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing} needed for the pool")
    for batch in parquet.iter_batches(batch_size=_READ_BATCH, columns=list(columns)):
        for column in batch.columns:
            yield [t for t in column.to_pylist() if t and t.strip()]


def _candidate_texts(pair_files: Sequence[str], corpus: str | None, max_corpus_docs: int | None) -> Iterator[list[str]]:
    for path in pair_files:
        fs, local = resolve_filesystem(path)
        yield from _texts_of(local, fs, ("positive", "hard_negative"))
    if corpus is None:
        return
    files = list_parquet_files(corpus)
    if not files:
        raise ConfigError(f"pool.include_corpus: no parquet file under {corpus}")
    fs, _ = resolve_filesystem(corpus)
    remaining = max_corpus_docs
    for path in files:
        for texts in _texts_of(path, fs, ("text",)):
            if remaining is not None:
                texts, remaining = texts[:remaining], remaining - min(len(texts), remaining)
            yield texts
            if remaining == 0:
                return


def _estimate_candidates(pair_files: Sequence[str], corpus: str | None, max_corpus_docs: int | None) -> int:
    def rows(paths: Sequence[str]) -> int:
        total = 0
        for path in paths:
            fs, local = resolve_filesystem(path)
            total += pq.ParquetFile(local, filesystem=fs).metadata.num_rows
        return total

    corpus_rows = rows(list_parquet_files(corpus)) if corpus else 0
    if max_corpus_docs is not None:
        corpus_rows = min(corpus_rows, max_corpus_docs)
    return 2 * rows(pair_files) + corpus_rows


def _partition(store: VectorStore, pair_files: Sequence[str], corpus: str | None, max_corpus_docs: int | None,
               rows_per_shard: int) -> list[str]:
    """Write the candidate texts into hash buckets under ``_staging/``; return the bucket names."""
    staging = posixpath.join(store.root, "_staging")
    buckets = max(1, math.ceil(_estimate_candidates(pair_files, corpus, max_corpus_docs) / rows_per_shard))
    names = [f"pool-{b:05d}" for b in range(buckets)]
    if store.has_file("_staging", "_partitioned"):
        return names
    store.fs.create_dir(staging, recursive=True)
    writers = [pq.ParquetWriter(posixpath.join(staging, f"{name}.parquet"), POOL_ROW_SCHEMA, filesystem=store.fs)
               for name in names]
    try:
        for texts in _candidate_texts(pair_files, corpus, max_corpus_docs):
            if not texts:
                continue
            keys = text_keys(texts)
            bucket_of = np.mod(keys, buckets)
            table = pa.table({"text_key": keys, "text": texts}, schema=POOL_ROW_SCHEMA)
            for b in np.unique(bucket_of):
                writers[b].write_table(table.filter(pa.array(bucket_of == b)))
    finally:
        for writer in writers:
            writer.close()
    store.write_file(b"", "_staging", "_partitioned")
    return names


def _unique_rows(table: pa.Table) -> pa.Table:
    """First occurrence of each key, in input order."""
    _, first = np.unique(table.column("text_key").to_numpy(), return_index=True)
    return table.take(np.sort(first))


def _encode(table: pa.Table, model_path: str, teacher: Any) -> np.ndarray:
    import ray

    from babelforge.encoding import embed_dataset, plan_actors

    rows = table.num_rows
    plan = plan_actors(teacher.actors, teacher.gpus_per_actor)
    per_block = max(1, math.ceil(rows / max(plan.actors * 4, math.ceil(rows / 8192))))
    blocks = [pa.table({"row": np.arange(start, min(start + per_block, rows)),
                        "text": table.column("text").slice(start, per_block)}) for start in range(0, rows, per_block)]
    ds = embed_dataset(ray.data.from_arrow(blocks), model_path, prompt_name=teacher.passage_prompt,
                       batch_size=teacher.batch_size, rows_per_call=teacher.rows_per_call, dim=teacher.dim,
                       actors=plan.actors, gpus_per_actor=teacher.gpus_per_actor, dtype=teacher.dtype)
    out: np.ndarray | None = None
    for batch in ds.select_columns(["row", "embedding"]).iter_batches(batch_size=8192, batch_format="numpy"):
        emb = np.stack(batch["embedding"]).astype(np.float32, copy=False)
        if out is None:
            out = np.zeros((rows, emb.shape[1]), dtype=np.float32)
        out[batch["row"]] = emb
    assert out is not None
    return out


def build_pool(pool_dir: str, pair_files: Sequence[str], *, model_path: str, teacher: Any, sources: Any,
               corpus: str | None = None, max_corpus_docs: int | None = None,
               rows_per_shard: int = 250_000) -> VectorStore:
    """Build (or finish building) the pool of ``pair_files`` (+ corpus) in ``pool_dir``.

    ``teacher`` is the :class:`~babelforge.filter.config.TeacherConfig`; ``sources`` (JSON-able)
    describes where ``pair_files`` came from. ``store.json`` records both (mining reuses the
    teacher); a pool made from other sources or encoded with other teacher settings is refused
    (:class:`ConfigError`).
    """
    store = VectorStore(pool_dir)
    metadata = store.read_metadata()
    base = {"teacher": teacher.model_dump(mode="json"), "encoding": teacher.pool_fingerprint(),
            "sources": sources, "corpus": corpus, "max_corpus_docs": max_corpus_docs}
    if metadata is not None:
        changed = sorted(key for key in ("encoding", "sources", "corpus", "max_corpus_docs")
                         if metadata.get(key) != base[key])
        if changed:
            raise ConfigError(f"pool {pool_dir} was built with other {', '.join(changed)} "
                              f"({ {k: metadata.get(k) for k in changed} }); use another pool.dir or delete it")
        if metadata.get("complete"):
            return store
    store.write_metadata({**base, "complete": False})
    started = time.time()
    names = _partition(store, pair_files, corpus, max_corpus_docs, rows_per_shard)
    candidates = unique = 0
    for name in names:
        if store.is_done(name):
            continue
        bucket = pq.read_table(posixpath.join(store.root, "_staging", f"{name}.parquet"), filesystem=store.fs)
        rows = _unique_rows(bucket)
        candidates += bucket.num_rows
        unique += rows.num_rows
        if rows.num_rows == 0:
            continue
        log.info("pool: encoding %s (%d unique of %d texts)", name, rows.num_rows, bucket.num_rows)
        store.write_shard(name, _encode(rows, model_path, teacher), rows)
    shards = store.shards()
    store.fs.delete_dir_contents(posixpath.join(store.root, "_staging"), missing_dir_ok=True)
    store.write_metadata({**base, "complete": True, "shards": len(shards),
                          "texts": sum(s.rows for s in shards), "dim": shards[0].dim if shards else None,
                          "encoded_this_run": unique, "candidates_this_run": candidates,
                          "seconds_this_run": round(time.time() - started, 3)})
    return store


def open_pool(pool_dir: str) -> tuple[VectorStore, dict[str, Any]]:
    """A complete pool and its metadata; :class:`ConfigError` if there is none at ``pool_dir``."""
    store = VectorStore(pool_dir)
    metadata = store.read_metadata()
    if not metadata or not metadata.get("complete"):
        raise ConfigError(f"{pool_dir} holds no complete pool; run `babelforge filter` first (it builds the pool)")
    return store, metadata


class PoolLookup:
    """Pool row of a text (by its key); ``-1`` for texts that are not in the pool."""

    def __init__(self, store: VectorStore) -> None:
        keys = [store.read_rows(s.name, ["text_key"]).column("text_key").to_numpy() for s in store.shards()]
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        self._order = np.argsort(all_keys, kind="stable")
        self._sorted = all_keys[self._order]

    def rows_of(self, texts: Sequence[str | None]) -> np.ndarray:
        present = [i for i, t in enumerate(texts) if t]
        out = np.full(len(texts), -1, dtype=np.int64)
        if not present or not len(self._sorted):
            return out
        keys = text_keys(texts[i] for i in present)
        pos = np.clip(np.searchsorted(self._sorted, keys), 0, len(self._sorted) - 1)
        found = self._sorted[pos] == keys
        out[np.asarray(present)[found]] = self._order[pos[found]]
        return out


class PoolTexts:
    """Texts of pool rows: all loaded (``resident``) or read from the touched shards on each call."""

    def __init__(self, store: VectorStore, resident: bool) -> None:
        self.store = store
        self.shards = store.shards()
        self._offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        self._texts = [self._load(i) for i in range(len(self.shards))] if resident else None

    def _load(self, position: int) -> pa.ChunkedArray:
        return self.store.read_rows(self.shards[position].name, ["text"]).column("text")

    def texts_of(self, rows: np.ndarray) -> list[str | None]:
        """Text of each row (None for ``-1`` padding)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out: list[str | None] = [None] * len(rows)
        valid = np.nonzero(rows >= 0)[0]
        shard_pos = np.searchsorted(self._offsets, rows[valid], side="right") - 1
        for pos in np.unique(shard_pos):
            members = valid[shard_pos == pos]
            column = self._texts[pos] if self._texts is not None else self._load(pos)
            for i, text in zip(members, column.take(pa.array(rows[members] - self._offsets[pos])).to_pylist()):
                out[i] = text
        return out
