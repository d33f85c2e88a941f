"""Teacher search in Ray Data actors, and the driver loop that streams their rows into stage shards.

Filtering and mining run the same pipeline over their input shards::

    pending shard files -> read (one block per shard) -> map_batches(<stage>Actor) -> driver -> ShardWriter

A :class:`PoolSearchActor` loads the teacher :class:`~babelforge.models.Embedder` and the pool's
:class:`~babelforge.index.ShardedIndex` once, then per chunk of pairs: checks the pairs
(:func:`~babelforge.filter.ranking.pair_problem`), finds each positive's pool row, encodes the
queries, searches the pool and scores the positives; the stage subclass turns that into output
rows (or quarantine rows). A pool text identical to the query (with bitext in both directions,
the query is another pair's positive) is removed from the query's results: it would trivially
rank first. Pool texts sharing the pair's translation group (:mod:`babelforge.schema`), other
than the positive, are marked in ``BatchSearch.same_group`` (mining drops them as a selection
rule); with ``PoolSearchActor.exclude_same_group`` (filtering) they are removed from the results
like the query's own text, and the search reaches deeper by the largest group in the batch so the
first ``search_depth`` remaining results are still the true top ones. The actor pool follows
:func:`babelforge.encoding.plan_actors`: one actor per GPU (the model and, when faiss has GPU
support, a faiss GPU index on that GPU), otherwise CPU actors that leave a core free for Ray
Data's own tasks.

:func:`stream_into_shards` routes each result row to the sink of the shard it came from and
commits a shard as soon as all its rows are in, so a crash loses only unfinished shards and a
rerun skips committed ones. Columns ``_stat_<name>`` are summed into the shard's statistics.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from babelforge.data.pairs import pair_record
from babelforge.data.shards import (REJECT_DETAIL, REJECT_REASON, REJECT_RECORD, REJECT_SOURCE, ShardStats,
                                    ShardWriter, resolve_filesystem)
from babelforge.filter.ranking import pair_problem, scores_of_rows

log = logging.getLogger(__name__)

__all__ = ["PoolSearchActor", "BatchSearch", "stream_into_shards", "search_pipeline", "without_results", "STAT_PREFIX",
           "PATH_COLUMN", "ShardHook", "read_shards", "shard_name"]

STAT_PREFIX = "_stat_"
PATH_COLUMN = "path"   # the input shard file of a row, added by read_shards

ShardHook = Callable[[str, ShardStats], None]


def shard_name(path: str) -> str:
    """Shard name of a parquet file (its file name without ``.parquet``)."""
    return posixpath.basename(path).removesuffix(".parquet")


class BatchSearch:
    """One batch's pairs after teacher search. ``valid`` indexes the rows that were searched; the
    arrays below have one entry per valid row (``rows`` / ``scores``: search results, best first;
    ``same_group``: whether a result shares the pair's translation group and is not its positive;
    ``group_rows``: the pool rows of the pair's translation group)."""

    def __init__(self, table: pa.Table, reasons: list[str | None], details: list[str | None]) -> None:
        self.table = table
        self.reasons = reasons
        self.details = details
        self.valid = np.array([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
        self.queries = np.zeros((0, 0), dtype=np.float32)
        self.rows = np.zeros((0, 0), dtype=np.int64)
        self.scores = np.zeros((0, 0), dtype=np.float32)
        self.same_group = np.zeros((0, 0), dtype=bool)
        self.positive_rows = np.zeros(0, dtype=np.int64)
        self.positive_scores = np.zeros(0, dtype=np.float32)
        self.group_rows: list[np.ndarray] = []

    def in_group(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` (``[valid rows, n]``) shares its pair's translation group, the
        positive's own row excepted."""
        members = np.stack([np.isin(r, group) for r, group in zip(rows, self.group_rows)])
        return members & (rows != self.positive_rows[:, None])

    def reject(self, row: int, reason: str, detail: str) -> None:
        self.reasons[row], self.details[row] = reason, detail

    def output(self, columns: dict[str, Any]) -> pa.Table:
        """The input columns, ``columns`` (replacing input columns of the same name) and the quarantine routing."""
        table = self.table
        for name, values in columns.items():
            values = values if isinstance(values, pa.Array) else pa.array(values)
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, values)
            else:
                table = table.append_column(name, values)
        records: list[str | None] = [None] * table.num_rows
        if any(self.reasons):
            rows = self.table.to_pylist()
            records = [pair_record(row) if reason else None for row, reason in zip(rows, self.reasons)]
        sources = [f"{s or 'pairs'}:{i}" for s, i in zip(self.table.column("source").to_pylist(),
                                                         self.table.column("id").to_pylist())]
        return (table.append_column(REJECT_REASON, pa.array(self.reasons, pa.string()))
                .append_column(REJECT_DETAIL, pa.array(self.details, pa.string()))
                .append_column(REJECT_RECORD, pa.array(records, pa.string()))
                .append_column(REJECT_SOURCE, pa.array(sources, pa.string())))


class PoolSearchActor:
    """Ray Data callable class: teacher + pool index, loaded once per actor. Subclasses define
    :attr:`search_depth`, :attr:`exclude_same_group` and :meth:`finish` (the stage's output for a
    searched batch)."""

    def __init__(self, model_path: str, pool_dir: str, index: dict[str, Any], teacher: dict[str, Any],
                 device: str = "cpu", torch_threads: int | None = None, rows_per_call: int = 512,
                 load_texts: bool = False) -> None:
        import faiss
        import torch

        from babelforge.filter.pool import PoolGroups, PoolLookup, PoolTexts
        from babelforge.index import IndexConfig, ShardedIndex, VectorStore
        from babelforge.models import Embedder, inference_placement

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
            faiss.omp_set_num_threads(int(torch_threads))
        device, dtype = inference_placement(device, teacher.get("dtype") or None)
        self.model = Embedder.from_pretrained(model_path, device=device, dtype=dtype)
        self.teacher = teacher
        self.rows_per_call = rows_per_call
        store = VectorStore(pool_dir)
        index_config = IndexConfig(**index)
        self.index = ShardedIndex(store, index_config)
        self.lookup = PoolLookup(store)
        self.groups = PoolGroups(store)
        self.texts = PoolTexts(store, resident=index_config.resident) if load_texts else None

    # ------------------------------------------------------------------------------ for subclasses
    search_depth: int = 1
    exclude_same_group: bool = False   # remove the pair's other group texts from the results

    def finish(self, search: BatchSearch) -> pa.Table:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the pipeline step
    def query_prompt(self, task: str | None, instruction: str | None) -> str:
        """Prompt text of a query: the instruction template filled with the pair's instruction, else the
        teacher's prompt named after the task, else the ``query_prompt``."""
        template = self.teacher.get("instruction_template")
        if template and instruction:
            return template.format(instruction=instruction)
        prompts = self.model.config.prompts
        if task and task in prompts:
            return prompts[task]
        return self.model.resolve_prompt(self.teacher.get("query_prompt"))

    def encode_queries(self, queries: Sequence[str], tasks: Sequence[str | None],
                       instructions: Sequence[str | None]) -> np.ndarray:
        prompts = [self.query_prompt(t, i) for t, i in zip(tasks, instructions)]
        out = np.zeros((len(queries), self.index.dim), dtype=np.float32)
        for prompt in sorted(set(prompts)):
            members = [i for i, p in enumerate(prompts) if p == prompt]
            out[members] = self.model.encode([queries[i] for i in members], prompt=prompt,
                                             batch_size=self.teacher["batch_size"], dim=self.teacher.get("dim"))
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        """Output rows for a block (a whole shard), computed ``rows_per_call`` rows at a time."""
        parts = [self.process(table.slice(start, self.rows_per_call))
                 for start in range(0, table.num_rows, self.rows_per_call)]
        return pa.concat_tables(parts) if parts else self.process(table)

    def process(self, table: pa.Table) -> pa.Table:
        """Check, encode, search and score one chunk of pairs; the subclass's :meth:`finish` makes the output."""
        queries, positives = table.column("query").to_pylist(), table.column("positive").to_pylist()
        problems = [pair_problem(q, p) for q, p in zip(queries, positives)]
        positive_rows = self.lookup.rows_of([p if problem is None else None for p, problem in zip(positives, problems)])
        for i, problem in enumerate(problems):
            if problem is None and positive_rows[i] < 0:
                problems[i] = ("positive_not_in_pool", "field 'positive' is not in the candidate pool "
                                                       "(the pool was built from other pairs)")
        search = BatchSearch(table, [p[0] if p else None for p in problems], [p[1] if p else None for p in problems])
        if len(search.valid):
            valid = search.valid.tolist()
            tasks, instructions = table.column("task").to_pylist(), table.column("instruction").to_pylist()
            search.queries = self.encode_queries([queries[i] for i in valid], [tasks[i] for i in valid],
                                                 [instructions[i] for i in valid])
            query_rows = self.lookup.rows_of([queries[i] for i in valid])
            search.positive_rows = positive_rows[search.valid]
            groups = table.column("group").to_pylist()
            search.group_rows = self.groups.members([groups[i] for i in valid])
            # one more for the query's own row, and (if removed) each group's texts
            extra = 1 + (max(len(m) for m in search.group_rows) if self.exclude_same_group else 0)
            result = self.index.search(search.queries, self.search_depth + extra)
            same_group = search.in_group(result.indices)
            excluded = result.indices == query_rows[:, None]
            if self.exclude_same_group:
                excluded |= same_group
            search.rows, search.scores, search.same_group = without_results(
                excluded, self.search_depth, result.indices, result.scores, same_group)
            direct = np.einsum("ij,ij->i", search.queries, self.index.vectors(search.positive_rows))
            search.positive_scores = scores_of_rows(search.rows, search.scores, search.positive_rows, direct)
        return self.finish(search)


def without_results(excluded: np.ndarray, depth: int, *columns: np.ndarray) -> list[np.ndarray]:
    """Per query, ``columns`` (search results and anything aligned with them) without the results
    marked in ``excluded`` (e.g. the pool copy of the query itself), cut to ``depth`` columns; order
    is kept. The search must return at least ``depth`` + (excluded results) columns."""
    order = np.argsort(excluded, axis=1, kind="stable")[:, :depth]
    return [np.take_along_axis(column, order, axis=1) for column in columns]


def read_shards(batch: pa.Table) -> pa.Table:
    """Ray Data map: the rows of the parquet files named in ``batch["uri"]``, with their ``path``."""
    tables = []
    for uri in batch.column("uri").to_pylist():
        fs, path = resolve_filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        tables.append(table.append_column(PATH_COLUMN, pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def search_pipeline(files: Sequence[str], actor_cls: type[PoolSearchActor], constructor_kwargs: dict[str, Any],
                    teacher: Any) -> Any:
    """Lazy Ray Dataset: the rows of ``files`` (with their ``path``), in order, through a pool of ``actor_cls``.

    Each shard is one block and one actor call (the actor works through it ``rows_per_call`` rows
    at a time), and results come back in shard order, so the driver receives (and commits) whole
    shards one after another while the pipeline runs. (Ray Data's parquet reader would merge small
    files into one block whose results arrive only at the end.)
    """
    import ray

    from babelforge.encoding import plan_actors

    plan = plan_actors(teacher.actors, teacher.gpus_per_actor)
    log.info("teacher search with %s", plan.describe())
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=dict(constructor_kwargs, device="cuda" if plan.num_gpus else "cpu",
                                   torch_threads=plan.torch_threads, rows_per_call=teacher.rows_per_call),
        batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None)
    ds.context.execution_options.preserve_order = True
    return ds


def stream_into_shards(writer: ShardWriter, files: Sequence[str], make_dataset: Callable[[list[str]], Any], *,
                       on_shard_committed: ShardHook | None = None) -> int:
    """Run ``make_dataset(pending files)`` and commit each input shard's output rows; return the
    number of shards committed by this call (committed shards of earlier runs are skipped)."""
    pending = [f for f in files if not writer.is_done(shard_name(f))]
    if not pending:
        return 0
    rows_in: dict[str, int] = {}
    for path in pending:
        fs, local = resolve_filesystem(path)
        rows_in[shard_name(path)] = pq.ParquetFile(local, filesystem=fs).metadata.num_rows
    committed = 0

    def commit(shard: str, sink: Any) -> None:
        nonlocal committed
        stats = sink.commit()
        committed += 1
        if on_shard_committed is not None:
            on_shard_committed(shard, stats)

    for shard in [s for s, n in rows_in.items() if n == 0]:   # empty shards produce no batch
        commit(shard, writer.open(shard, rows_in=0))
    non_empty = [f for f in pending if rows_in[shard_name(f)]]
    if not non_empty:
        return committed
    sinks: dict[str, Any] = {}
    received: Counter[str] = Counter()
    try:
        for batch in make_dataset(non_empty).iter_batches(batch_format="pyarrow", batch_size=None):
            shards = np.array([shard_name(p) for p in batch.column(PATH_COLUMN).to_pylist()])
            stat_columns = [c for c in batch.column_names if c.startswith(STAT_PREFIX)]
            for shard in np.unique(shards):
                part = batch.filter(pa.array(shards == shard))
                sink = sinks.get(shard) or sinks.setdefault(shard, writer.open(shard, rows_in=rows_in[shard]))
                for column in stat_columns:
                    name = column[len(STAT_PREFIX):]
                    sink.extra[name] = sink.extra.get(name, 0) + (pc.sum(part.column(column)).as_py() or 0)
                sink.write(part.drop_columns([PATH_COLUMN, *stat_columns]))
                received[shard] += part.num_rows
                if received[shard] == rows_in[shard]:
                    commit(shard, sinks.pop(shard))
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    if sinks:
        for sink in sinks.values():
            sink.abort()
        raise RuntimeError(f"shards {sorted(sinks)} received {dict(received)} of {rows_in} rows; rows were lost")
    return committed
