"""The ``filter`` stage: ranking-consistency filtering of (query, positive) pairs with a teacher embedder.

A pair is kept only if the teacher, searching the whole candidate pool for the query, ranks the
pair's positive within the top ``k`` (default 50, as in KaLM-Embedding); its rank and score are
recorded. :func:`run_filter` (resumable: rerunning skips every committed piece):

1. writes the configured pair sources (:mod:`babelforge.data.pairs`) as shards of
   ``rows_per_shard`` pairs under ``<output_dir>/_pairs/`` (streamed; ``_complete.json`` last);
2. builds the candidate pool (:func:`babelforge.filter.pool.build_pool`: positives, hard
   negatives and optional corpus texts, each once, encoded by the teacher in a Ray Data actor
   pool) under ``pool.dir`` (default ``<output_dir>/_pool``);
3. streams the pending pair shards through :class:`FilterActor` actors (teacher + pool index per
   actor) into a :class:`~babelforge.data.shards.ShardWriter`.

Output ``<output_dir>/data/<shard>.parquet``: :data:`FILTERED_PAIR_SCHEMA` (``PAIR_SCHEMA``, with
its translation ``group``, plus ``positive_rank``, 1 = best, and ``positive_score``). Quarantine
reasons: ``positive_not_in_top_k`` (detail: the positive's score and the k-th result's),
``missing_field``, ``empty_text``, ``query_equals_positive``, ``positive_not_in_pool``. Rank rule:
see :mod:`babelforge.filter.ranking`; the query's own pool text and the other texts of the pair's
translation group are not competitors, so ``positive_rank`` is the rank among the texts that are
not alternative correct answers.

    >>> cfg = load_config("jobs/configs/filter.yaml", FilterConfig)          # doctest: +SKIP
    >>> print(format_report(run_filter(cfg)))                                  # doctest: +SKIP
    [filter] shards=3 rows in=3000 kept=2861 quarantined=139 (positive_not_in_top_k=139)
    [filter] pool: 3102 texts in 1 shard(s); positive ranked first for 2409 of 2861 kept pairs (84.2%), mean rank 2.31
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelforge.data.pairs import PAIRS_INPUT_SCHEMA, iter_pair_tables
from babelforge.data.shards import ShardWriter, StageSummary, resolve_filesystem
from babelforge.errors import ConfigError
from babelforge.filter.config import FilterConfig, join_uri
from babelforge.filter.pool import build_pool
from babelforge.filter.ranking import BEYOND_K, positive_ranks
from babelforge.filter.teacher import (STAT_PREFIX, BatchSearch, PoolSearchActor, ShardHook, search_pipeline,
                                      stream_into_shards)
from babelforge.schema import PAIR_SCHEMA

log = logging.getLogger(__name__)

__all__ = ["run_filter", "format_report", "FilterActor", "FILTERED_PAIR_SCHEMA", "STAGE", "write_pair_shards",
           "check_fingerprint"]

STAGE = "filter"
FILTERED_PAIR_SCHEMA = pa.schema([
    *PAIR_SCHEMA,                                              # including the translation `group`
    pa.field("positive_rank", pa.int32(), nullable=False),     # teacher rank of the positive in the pool (1 = top)
    pa.field("positive_score", pa.float32(), nullable=False),  # teacher score of (query, positive)
])


class FilterActor(PoolSearchActor):
    """Keeps pairs whose positive ranks within the top ``k``; quarantines the others. The other texts
    of the pair's translation group are alternative correct answers, not competitors: they are
    removed from the results before ranking."""

    exclude_same_group = True

    def __init__(self, *, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = self.search_depth = k

    def finish(self, search: BatchSearch) -> pa.Table:
        n = search.table.num_rows
        ranks: list[int | None] = [None] * n
        scores: list[float | None] = [None] * n
        if len(search.valid):
            found = positive_ranks(search.rows, search.scores, search.positive_rows, search.positive_scores, self.k)
            kth = search.scores[:, self.k - 1]
            for j, i in enumerate(search.valid.tolist()):
                scores[i] = float(search.positive_scores[j])
                if found[j] == BEYOND_K:
                    search.reject(i, "positive_not_in_top_k",
                                  f"field 'positive' ranks below the top {self.k} (> {self.k}): score "
                                  f"{scores[i]:.4f}, the {self.k}th result scores {kth[j]:.4f}")
                else:
                    ranks[i] = int(found[j])
        kept_ranks = np.array([r if r is not None else 0 for r in ranks])
        return search.output({"positive_rank": pa.array(ranks, pa.int32()),
                              "positive_score": pa.array(scores, pa.float32()),
                              f"{STAT_PREFIX}rank_1": pa.array((kept_ranks == 1).astype(np.int64)),
                              f"{STAT_PREFIX}rank_sum": pa.array(kept_ranks.astype(np.int64))})


def check_fingerprint(output_dir: str, name: str, fingerprint: dict[str, Any]) -> None:
    """Record ``fingerprint`` in ``<output_dir>/<name>``, or refuse if it records different settings."""
    fs, root = resolve_filesystem(output_dir)
    path = posixpath.join(root, name)
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            recorded = json.loads(f.read())
        changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
        if changed:
            raise ConfigError(f"{output_dir} was written with other settings for {', '.join(changed)}; "
                              "use a new output_dir (or delete it) to change them")
        return
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(fingerprint, indent=2, ensure_ascii=False).encode())


def write_pair_shards(cfg: FilterConfig) -> list[str]:
    """Write the configured sources as pair shards under ``<output_dir>/_pairs`` (once); return their URIs."""
    fs, root = resolve_filesystem(cfg.output_dir)
    pairs_dir = posixpath.join(root, "_pairs")
    marker = posixpath.join(pairs_dir, "_complete.json")
    if fs.get_file_info(marker).type != pafs.FileType.File:
        fs.create_dir(pairs_dir, recursive=True)
        names: list[str] = []
        pending: list[pa.Table] = []

        def flush(tables: list[pa.Table]) -> None:
            name = f"pairs-{len(names):05d}"
            pq.write_table(pa.concat_tables(tables), posixpath.join(pairs_dir, f"{name}.parquet"), filesystem=fs)
            names.append(name)

        buffered = 0
        for source in cfg.inputs:
            for table in iter_pair_tables(source):
                pending.append(table)
                buffered += table.num_rows
                while buffered >= cfg.rows_per_shard:
                    merged = pa.concat_tables(pending)
                    flush([merged.slice(0, cfg.rows_per_shard)])
                    pending = [merged.slice(cfg.rows_per_shard)]
                    buffered -= cfg.rows_per_shard
        if buffered or not names:
            flush(pending or [PAIRS_INPUT_SCHEMA.empty_table()])
        with fs.open_output_stream(marker) as f:
            f.write(json.dumps({"shards": names}).encode())
    with fs.open_input_stream(marker) as f:
        names = json.loads(f.read())["shards"]
    return [join_uri(cfg.output_dir, f"_pairs/{name}.parquet") for name in names]


def run_filter(cfg: FilterConfig, *, on_shard_committed: ShardHook | None = None) -> StageSummary:
    """Run (or resume) filtering into ``cfg.output_dir``; return the totals over all its shards.

    Ray is started with ``cfg.ray`` unless already initialised. ``on_shard_committed`` is called
    after each shard this run commits (progress; tests use it to simulate a crash).
    """
    from babelforge.models.sources import resolve_model_dir
    from babelforge.utils.ray_env import init_ray

    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    check_fingerprint(cfg.output_dir, "filter.json", cfg.fingerprint())
    pair_files = write_pair_shards(cfg)
    model_path = str(resolve_model_dir(cfg.teacher.model))
    pool = build_pool(cfg.pool_dir(), pair_files, model_path=model_path, teacher=cfg.teacher,
                      sources=[s.model_dump(mode="json") for s in cfg.inputs], corpus=cfg.pool.include_corpus,
                      max_corpus_docs=cfg.pool.max_corpus_docs, rows_per_shard=cfg.pool.rows_per_shard)
    writer = ShardWriter(cfg.output_dir, stage=STAGE, schema=FILTERED_PAIR_SCHEMA)
    actor_kwargs = dict(model_path=model_path, pool_dir=cfg.pool_dir(), index=cfg.index.model_dump(),
                        teacher=cfg.teacher.model_dump(), k=cfg.k)
    committed = stream_into_shards(
        writer, pair_files, lambda files: search_pipeline(files, FilterActor, actor_kwargs, cfg.teacher),
        on_shard_committed=on_shard_committed)
    summary = writer.summary()
    metadata = pool.read_metadata() or {}
    summary.extra.update(pool_texts=metadata.get("texts", 0), pool_shards=metadata.get("shards", 0),
                         shards_this_run=committed)
    return summary


def format_report(summary: StageSummary) -> str:
    """The summary line plus the pool size and how highly the teacher ranked the kept positives."""
    extra = summary.extra
    kept = summary.kept
    top1 = int(extra.get("rank_1", 0))
    ranks = (f"positive ranked first for {top1} of {kept} kept pairs ({100 * top1 / kept:.1f}%), "
             f"mean rank {extra.get('rank_sum', 0) / kept:.2f}" if kept else "no pair kept")
    return (f"{summary.format()}\n[{STAGE}] pool: {extra.get('pool_texts', 0)} texts in "
            f"{extra.get('pool_shards', 0)} shard(s); {ranks}")
