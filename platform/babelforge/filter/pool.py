"""The candidate pool: the unique texts queries are ranked against, encoded once by the teacher.

Pool = the positives and hard negatives of all pairs plus, optionally, corpus texts (ingest
output), each text once. It is a :class:`~babelforge.index.VectorStore` whose payload rows
(:data:`POOL_ROW_SCHEMA`) are ``text_key`` (int64: the first 8 bytes of the BLAKE2b hash of the
UTF-8 text), ``text`` and ``groups``; a pair finds its positive's pool row through the key
(:class:`PoolLookup`). Two different texts with the same 64-bit key would share a row; for a pool
of ``n`` texts that happens with probability about ``n**2 / 2**65`` (0.03 % for 100 million texts).

``groups`` are the translation groups (:mod:`babelforge.schema`) of the text: the sorted
``group`` values of every pair whose query or positive it is (a text can be the positive of
several pairs, e.g. the English side shared by de-en and fr-en; and a query of one pair can be a
pool text through another). Hard negatives and corpus texts gain no group from being one.
:class:`PoolGroups` answers "which pool texts share this pair's group" from these.

Building (:func:`build_pool`) streams and never holds more than one shard of texts:

1. *partition* (driver): every candidate text, and every query text of a pair with a group (as
   a group membership only, never a pool row), goes to bucket ``key mod B`` under ``_staging/``
   with ``B = ceil(candidates / rows_per_shard)``, so copies of a text always share a bucket;
2. *encode* (per bucket): drop repeated keys (first occurrence wins), collect each text's groups
   from all its copies, embed with the teacher's passage prompt through a Ray Data actor pool
   (:func:`babelforge.encoding.embed_dataset`: one actor per GPU, CPU actors otherwise) and commit
   the bucket as pool shard ``pool-<bucket>``. A rerun skips committed shards, so an interrupted
   build resumes without re-encoding.

``store.json`` records the pool format (:data:`POOL_FORMAT`), the teacher settings the pool was
encoded with and the counts::

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from babelforge.data.shards import list_parquet_files, resolve_filesystem
from babelforge.errors import ConfigError, DataFormatError
from babelforge.index import VectorStore

log = logging.getLogger(__name__)

__all__ = ["text_keys", "build_pool", "PoolLookup", "PoolTexts", "PoolGroups", "POOL_ROW_SCHEMA", "POOL_FORMAT",
           "open_pool"]

# 2: pool rows carry their translation groups. Pools of another format are refused (rebuild them).
POOL_FORMAT = 2
POOL_ROW_SCHEMA = pa.schema([pa.field("text_key", pa.int64(), nullable=False),
                             pa.field("text", pa.string(), nullable=False),
                             pa.field("groups", pa.list_(pa.string()), nullable=False)])
# A staged text: a pool candidate (``in_pool``) or only a group membership (a pair's query).
_STAGED_SCHEMA = pa.schema([pa.field("text_key", pa.int64(), nullable=False),
                            pa.field("text", pa.string(), nullable=False),
                            pa.field("group", pa.string()),
                            pa.field("in_pool", pa.bool_(), nullable=False)])
_PAIR_COLUMNS = ("query", "positive", "hard_negative", "group")
_READ_BATCH = 8192


def text_keys(texts: Iterable[str]) -> np.ndarray:
    """64-bit keys of texts (BLAKE2b of the UTF-8 bytes), as int64."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little",
                                       signed=True) for t in texts), dtype=np.int64)


def _batches(path: str, fs: Any, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """``columns`` of a parquet file, batch by batch."""
    parquet = pq.ParquetFile(path, filesystem=fs)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing} needed for the pool")
    yield from parquet.iter_batches(batch_size=_READ_BATCH, columns=list(columns))


def _staged(texts: list[str | None], groups: list[str | None] | None, in_pool: bool) -> pa.Table:
    """Staged rows of the non-blank ``texts`` (with their ``groups``); membership-only rows
    (``in_pool=False``) only where there is a group."""
    keep = [i for i, t in enumerate(texts) if t and t.strip() and (in_pool or (groups and groups[i] is not None))]
    kept = [texts[i] for i in keep]
    return pa.table({"text_key": text_keys(kept), "text": kept,
                     "group": [groups[i] for i in keep] if groups else pa.nulls(len(keep), pa.string()),
                     "in_pool": [in_pool] * len(keep)}, schema=_STAGED_SCHEMA)


def _staged_rows(pair_files: Sequence[str], corpus: str | None, max_corpus_docs: int | None) -> Iterator[pa.Table]:
    """Pool candidates (positives, hard negatives, corpus texts) and the group memberships of queries."""
    for path in pair_files:
        fs, local = resolve_filesystem(path)
        for batch in _batches(local, fs, _PAIR_COLUMNS):
            groups = batch.column("group").to_pylist()
            yield _staged(batch.column("positive").to_pylist(), groups, in_pool=True)
            yield _staged(batch.column("hard_negative").to_pylist(), None, in_pool=True)
            yield _staged(batch.column("query").to_pylist(), groups, in_pool=False)
    if corpus is None:
        return
    files = list_parquet_files(corpus)
    if not files:
        raise ConfigError(f"pool.include_corpus: no parquet file under {corpus}")
    fs, _ = resolve_filesystem(corpus)
    remaining = max_corpus_docs
    for path in files:
        for batch in _batches(path, fs, ("text",)):
            table = _staged(batch.column("text").to_pylist(), None, in_pool=True)
            if remaining is not None:
                table, remaining = table.slice(0, remaining), remaining - min(table.num_rows, remaining)
            yield table
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
    writers = [pq.ParquetWriter(posixpath.join(staging, f"{name}.parquet"), _STAGED_SCHEMA, filesystem=store.fs)
               for name in names]
    try:
        for table in _staged_rows(pair_files, corpus, max_corpus_docs):
            if not table.num_rows:
                continue
            bucket_of = np.mod(table.column("text_key").to_numpy(), buckets)
            for b in np.unique(bucket_of):
                writers[b].write_table(table.filter(pa.array(bucket_of == b)))
    finally:
        for writer in writers:
            writer.close()
    store.write_file(b"", "_staging", "_partitioned")
    return names


def _pool_rows(staged: pa.Table) -> pa.Table:
    """A bucket's pool rows: each candidate text once (first occurrence, in input order) with the
    sorted groups of all staged copies of it."""
    candidates = staged.filter(staged.column("in_pool"))
    _, first = np.unique(candidates.column("text_key").to_numpy(), return_index=True)
    rows = candidates.take(np.sort(first))
    members = staged.filter(pc.is_valid(staged.column("group")))
    groups_of: dict[int, set[str]] = {}
    for key, group in zip(members.column("text_key").to_pylist(), members.column("group").to_pylist()):
        groups_of.setdefault(key, set()).add(group)
    groups = [sorted(groups_of.get(key, ())) for key in rows.column("text_key").to_pylist()]
    return pa.table({"text_key": rows.column("text_key"), "text": rows.column("text"),
                     "groups": pa.array(groups, pa.list_(pa.string()))}, schema=POOL_ROW_SCHEMA)


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
    base = {"format": POOL_FORMAT, "teacher": teacher.model_dump(mode="json"), "encoding": teacher.pool_fingerprint(),
            "sources": sources, "corpus": corpus, "max_corpus_docs": max_corpus_docs}
    if metadata is not None:
        changed = sorted(key for key in ("format", "encoding", "sources", "corpus", "max_corpus_docs")
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
        rows = _pool_rows(bucket)
        bucket_candidates = pc.sum(bucket.column("in_pool").cast(pa.int64())).as_py() or 0
        candidates += bucket_candidates
        unique += rows.num_rows
        if rows.num_rows == 0:
            continue
        log.info("pool: encoding %s (%d unique of %d texts)", name, rows.num_rows, bucket_candidates)
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
    if metadata.get("format") != POOL_FORMAT:
        raise ConfigError(f"{pool_dir} is a pool of format {metadata.get('format')} (without translation groups); "
                          f"this version needs format {POOL_FORMAT}: rerun `babelforge filter` into a new output_dir")
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


class PoolGroups:
    """Which pool rows belong to a translation group; all memberships are loaded.

    Kept as two sorted int64 arrays (group key, row), one entry per (text, group) membership:
    16 bytes each, nothing for ungrouped texts. Group keys are 64-bit hashes like text keys
    (:func:`text_keys` of the group string).
    """

    def __init__(self, store: VectorStore) -> None:
        keys, rows = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for shard in store.shards():
            groups = store.read_rows(shard.name, ["groups"]).column("groups").combine_chunks()
            lengths = pc.list_value_length(groups).to_numpy(zero_copy_only=False)
            keys.append(text_keys(pc.list_flatten(groups).to_pylist()))
            rows.append(np.repeat(np.arange(shard.offset, shard.offset + shard.rows, dtype=np.int64), lengths))
        all_keys, all_rows = np.concatenate(keys), np.concatenate(rows)
        order = np.lexsort((all_rows, all_keys))
        self._keys, self._rows = all_keys[order], all_rows[order]

    def members(self, groups: Sequence[str | None]) -> list[np.ndarray]:
        """Per group, the sorted pool rows of its texts (empty for ``None`` and unknown groups)."""
        out = [np.zeros(0, dtype=np.int64)] * len(groups)
        present = [i for i, g in enumerate(groups) if g is not None]
        if present:
            keys = text_keys(groups[i] for i in present)
            starts = np.searchsorted(self._keys, keys, side="left")
            stops = np.searchsorted(self._keys, keys, side="right")
            for i, start, stop in zip(present, starts, stops):
                out[i] = self._rows[start:stop]
        return out
