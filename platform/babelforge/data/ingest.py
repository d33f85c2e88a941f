"""The ingest stage: jsonl / parquet / text sources -> cleaned, deduplicated corpus shards + quarantine.

    from babelforge.config import load_config
    cfg = load_config("jobs/configs/ingest.yaml", IngestConfig, ["output_dir=/tmp/ingest"])
    print(format_report(run_ingest(cfg)))
    # [ingest] shards=46 rows in=59828 kept=58416 quarantined=1412 (exact_duplicate=1348, near_duplicate=63, ...)

Two resumable phases, each committing one shard at a time through
:class:`~babelforge.data.shards.ShardWriter` (an interrupted run picks up at the first uncommitted shard):

1. **validate** (Ray Data, one task per shard, streamed to the driver): read the shard's records, take
   the configured fields, normalise, check, drop evaluation texts, detect missing languages and apply
   the overlong rule (:mod:`babelforge.data.validate`). Output: ``<output_dir>/_ingest/staging/`` shards.
   With ``decontaminate`` on, the driver first indexes the evaluation texts (held-out NTREX lines,
   ``text_files``; :mod:`babelforge.data.decontaminate`), a few tens of thousands of 64-bit hashes
   that every task receives through the object store; matches are quarantined as ``eval_contamination``.
2. **dedup**: a Ray Data pass over the staging shards emits small key rows (id, text hash, MinHash
   bands), sorts them and sends only repeated keys to the driver, which decides what to drop
   (:mod:`babelforge.data.dedup`) and saves the decision to ``_ingest/duplicates.parquet``. Each staging
   shard is then rewritten to ``<output_dir>/data/`` with its duplicates, and its phase-1 quarantine,
   in ``<output_dir>/quarantine/``; per shard, rows in = kept + quarantined (minus the extra chunks
   of split texts, counted in ``extra.split_extra_rows``).

``<output_dir>/_ingest/plan.json`` records the files, their shards and the settings (with the size and
digest of the evaluation-text index); a rerun with other settings, changed input files or changed
evaluation texts is refused instead of mixing two runs. The staging shards are deleted
once every final shard is committed (unless ``keep_staging``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelforge.data.config import IngestConfig
from babelforge.data.decontaminate import EvalTextIndex, build_eval_index
from babelforge.data.dedup import DECISION_SCHEMA, DuplicateGroups, duplicate_keys, repeated_keys, resolve_duplicates
from babelforge.data.readers import InputFile, ShardSpec, plan_file, plan_shards, resolve_source
from babelforge.data.shards import (REJECT_DETAIL, REJECT_REASON, REJECT_RECORD, REJECT_SOURCE, ShardSink,
                                    ShardStats, ShardWriter, StageSummary, resolve_filesystem)
from babelforge.data.validate import process_shard
from babelforge.errors import ConfigError
from babelforge.schema import CORPUS_SCHEMA

if TYPE_CHECKING:
    from ray import ObjectRef

__all__ = ["run_ingest", "format_report", "STAGING_SCHEMA", "ShardHook"]

log = logging.getLogger(__name__)

STAGE = "ingest"
# Phase-1 rows: the corpus columns plus the order key used by dedup and the record's file:line.
STAGING_SCHEMA = CORPUS_SCHEMA.append(pa.field("seq", pa.int64(), nullable=False)).append(
    pa.field("origin", pa.string()))
_KEY_INPUT_COLUMNS = ["id", "text", "lang", "seq", "origin"]
_SEQ_BITS = 40   # seq = shard index << 40 | row within the staging shard: orders rows by (source, file, line)

ShardHook = Callable[[str, ShardStats], None]   # (phase "validate" | "dedup", committed shard)


def run_ingest(cfg: IngestConfig, *, on_shard_committed: ShardHook | None = None) -> StageSummary:
    """Run (or resume) ingest into ``cfg.output_dir`` and return the totals over all its shards.

    Ray is started with ``cfg.ray`` when there is work to do, unless already initialised.
    ``on_shard_committed`` is called after every committed shard of either phase (progress reporting;
    tests use it to simulate a crash).
    """
    final = ShardWriter(cfg.output_dir, stage=STAGE, schema=CORPUS_SCHEMA)
    work = posixpath.join(final.root, "_ingest")
    eval_texts = build_eval_index(cfg.decontaminate, cfg.normalize)
    if eval_texts is not None:
        log.info("[ingest] decontamination: %d distinct evaluation texts", len(eval_texts))
    plan = _load_or_make_plan(cfg, final.fs, work, _settings(cfg, eval_texts))
    if all(final.is_done(spec.name) for spec in plan):
        log.info("[ingest] all %d shards of %s are committed; nothing to do", len(plan), cfg.output_dir)
        return final.summary()

    _init_ray(cfg)
    staging = ShardWriter(_join_uri(cfg.output_dir, "_ingest/staging"), stage=STAGE, schema=STAGING_SCHEMA)
    resumed_validate = len(staging.completed())
    validated = _validate_phase(plan, staging, cfg, eval_texts, on_shard_committed)

    decisions_path = posixpath.join(work, "duplicates.parquet")
    if final.fs.get_file_info(decisions_path).type == pafs.FileType.NotFound:
        _write_parquet_atomically(final.fs, decisions_path, _find_duplicates(staging, cfg))
    deduplicated = _dedup_phase(plan, staging, final, decisions_path, on_shard_committed)

    if not cfg.keep_staging:
        final.fs.delete_dir(staging.root)
        final.fs.delete_file(decisions_path)
    summary = final.summary()
    summary.extra.update(validated_shards=validated, resumed_validated_shards=resumed_validate,
                         deduplicated_shards=deduplicated)
    return summary


def format_report(summary: StageSummary) -> str:
    """The summary line plus what ingest changed in the kept rows."""
    extra = summary.extra
    details = (f"[ingest] languages detected={extra.get('lang_detected', 0)}, "
               f"split texts={extra.get('split_texts', 0)} (+{extra.get('split_extra_rows', 0)} chunks), "
               f"truncated={extra.get('truncated', 0)}")
    if "validated_shards" in extra:
        details += (f"; this run validated {extra['validated_shards']} shard(s) "
                    f"({extra['resumed_validated_shards']} were already done) and wrote "
                    f"{extra['deduplicated_shards']} final shard(s)")
    return f"{summary.format()}\n{details}"


# ---------------------------------------------------------------------------------------------- plan

def _init_ray(cfg: IngestConfig) -> None:
    from babelforge.utils.ray_env import init_ray

    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)


def _join_uri(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _settings(cfg: IngestConfig, eval_texts: EvalTextIndex | None) -> dict[str, Any]:
    """What the plan records of the settings: the config's fingerprint and the evaluation texts' digest."""
    settings = cfg.fingerprint()
    if eval_texts is not None:
        settings["decontaminate"]["index"] = eval_texts.fingerprint()
    return settings


def _load_or_make_plan(cfg: IngestConfig, fs: pafs.FileSystem, work: str, settings: dict[str, Any]) -> list[ShardSpec]:
    files = [f for index, source in enumerate(cfg.sources) for f in resolve_source(source, index)]
    path = posixpath.join(work, "plan.json")
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            saved = json.loads(f.read().decode("utf-8"))
        old, new = _flatten(saved["config"]), _flatten(settings)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds a run made with other settings (changed: "
                              f"{', '.join(changed)}); rerun with the same settings to resume, or use a new output_dir")
        saved_files = [InputFile(**f) for f in saved["files"]]
        if saved_files != files:
            differ = next((a.uri for a, b in zip(saved_files, files) if a != b), "the list of files")
            raise ConfigError(f"output_dir {cfg.output_dir!r}: the input files changed since the run that made it "
                              f"(first difference: {differ}); use a new output_dir")
        return [ShardSpec.from_dict(s) for s in saved["shards"]]

    import ray

    _init_ray(cfg)
    started = time.time()
    scan = ray.remote(num_cpus=1)(plan_file)
    chunks = ray.get([scan.remote(f, cfg.rows_per_shard) for f in files])
    plan = plan_shards(files, cfg.rows_per_shard, chunks)
    fs.create_dir(work, recursive=True)
    payload = {"config": settings, "files": [dataclasses.asdict(f) for f in files],
               "shards": [spec.to_dict() for spec in plan]}
    _write_bytes_atomically(fs, path, json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))
    log.info("[ingest] planned %d shards over %d files in %.1fs", len(plan), len(files), time.time() - started)
    return plan


def _write_bytes_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _write_parquet_atomically(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp, filesystem=fs, row_group_size=65536)
    fs.move(tmp, path)


# ------------------------------------------------------------------------------------ phase 1: validate

def _process_specs(batch: pa.Table, cfg: IngestConfig,
                   eval_texts: "ObjectRef[EvalTextIndex] | None") -> Iterator[pa.Table]:
    import ray

    index = ray.get(eval_texts) if eval_texts is not None else None
    for spec in batch["spec"].to_pylist():
        yield from process_shard(ShardSpec.from_dict(json.loads(spec)), cfg, index)


def _count(table: pa.Table, flags: str | pa.ChunkedArray) -> int:
    """Number of true values in a boolean column (by name) or array; nulls count as false."""
    values = table[flags] if isinstance(flags, str) else flags
    return int(pc.sum(pc.fill_null(values, False).cast(pa.int64())).as_py() or 0)


def _commit(sink: ShardSink, expected_outputs: int, phase: str, hook: ShardHook | None) -> None:
    produced = sink.kept + sum(sink.quarantined.values())
    if produced != expected_outputs:
        sink.abort()
        raise RuntimeError(f"[ingest {phase}] shard {sink.shard}: expected {expected_outputs} output rows but "
                           f"got {sink.kept} kept + {produced - sink.kept} quarantined; a row was lost or duplicated")
    stats = sink.commit()
    if hook is not None:
        hook(phase, stats)


class _ValidatedShards:
    """Routes the streamed phase-1 output, which arrives shard after shard, into staging shards."""

    def __init__(self, writer: ShardWriter, specs: list[ShardSpec], hook: ShardHook | None) -> None:
        self._writer = writer
        self._specs = specs
        self._position = {spec.name: i for i, spec in enumerate(specs)}
        self._next = 0
        self._hook = hook
        self._sink: ShardSink | None = None
        self._spec: ShardSpec | None = None

    def __enter__(self) -> "_ValidatedShards":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._advance_to(len(self._specs))
        elif self._sink is not None:
            self._sink.abort()

    def write(self, table: pa.Table) -> None:
        shards = table["_shard"].to_pylist()
        start = 0
        for end in range(1, len(shards) + 1):
            if end == len(shards) or shards[end] != shards[start]:
                self._write_run(shards[start], table.slice(start, end - start))
                start = end

    def _write_run(self, shard: str, rows: pa.Table) -> None:
        if self._spec is None or shard != self._spec.name:
            position = self._position[shard]
            if position < self._next:
                raise RuntimeError(f"[ingest validate] rows of shard {shard} arrived after it was committed")
            self._advance_to(position)
            self._spec = self._specs[position]
            self._sink = self._writer.open(shard, rows_in=self._spec.num_rows, one_to_one=False)
            self._sink.extra = {"lang_detected": 0, "split_texts": 0, "split_extra_rows": 0, "truncated": 0}
            self._next = position + 1
        assert self._sink is not None and self._spec is not None
        kept = pc.is_null(rows[REJECT_REASON]).to_numpy(zero_copy_only=False)
        seq = np.zeros(len(kept), dtype=np.int64)
        seq[kept] = (self._spec.index << _SEQ_BITS) + self._sink.kept + np.arange(int(kept.sum()))
        first_chunks = pc.equal(rows["_chunk"], 0)
        extra = self._sink.extra
        extra["lang_detected"] += _count(rows.filter(first_chunks), "_lang_detected")
        extra["truncated"] += _count(rows, "_truncated")
        extra["split_texts"] += _count(rows, pc.equal(rows["_chunk"], 1))
        extra["split_extra_rows"] += _count(rows, pc.greater(rows["_chunk"], 0))
        self._sink.write(rows.append_column("seq", pa.array(seq, mask=~kept)))

    def _advance_to(self, position: int) -> None:
        """Commit the open shard and the (empty) shards before ``position`` that produced no rows."""
        if self._sink is not None and self._spec is not None:
            sink, spec = self._sink, self._spec
            self._sink, self._spec = None, None
            _commit(sink, spec.num_rows + sink.extra["split_extra_rows"], "validate", self._hook)
        for spec in self._specs[self._next:position]:
            sink = self._writer.open(spec.name, rows_in=spec.num_rows, one_to_one=False)
            _commit(sink, spec.num_rows, "validate", self._hook)
        self._next = max(self._next, position)


def _validate_phase(plan: list[ShardSpec], staging: ShardWriter, cfg: IngestConfig, eval_texts: EvalTextIndex | None,
                    hook: ShardHook | None) -> int:
    pending = [spec for spec in plan if not staging.is_done(spec.name)]
    if not pending:
        return 0
    import ray

    started = time.time()
    ds = ray.data.from_items([{"spec": json.dumps(spec.to_dict())} for spec in pending],
                             override_num_blocks=len(pending))
    eval_ref = ray.put(eval_texts) if eval_texts is not None else None   # one copy in the object store
    ds = ds.map_batches(_process_specs, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"cfg": cfg, "eval_texts": eval_ref})
    ds.context.execution_options.preserve_order = True   # shards arrive whole and in order
    with _ValidatedShards(staging, pending, hook) as router:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            router.write(batch)
    log.info("[ingest] validated %d shard(s) in %.1fs", len(pending), time.time() - started)
    return len(pending)


# --------------------------------------------------------------------------------------- phase 2: dedup

def _staging_keys(batch: pa.Table, dedup: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
    for uri in batch["file"].to_pylist():
        fs, path = resolve_filesystem(uri)
        with fs.open_input_file(path) as f:
            for rows in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=_KEY_INPUT_COLUMNS):
                yield duplicate_keys(pa.Table.from_batches([rows]), **dedup)


def _find_duplicates(staging: ShardWriter, cfg: IngestConfig) -> pa.Table:
    files = staging.data_files()
    if not files:
        return DECISION_SCHEMA.empty_table()
    import ray
    from ray.data.context import ShuffleStrategy

    started = time.time()
    # one task per staging shard computes its key rows; only those (not the texts) enter the sort
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED   # task-based; no actor pools
    keys = ds.map_batches(_staging_keys, batch_size=None, batch_format="pyarrow",
                          fn_kwargs={"dedup": cfg.dedup.model_dump(), "batch_rows": cfg.batch_rows})
    candidates = keys.sort("key").map_batches(repeated_keys, batch_size=None, batch_format="pyarrow")
    groups = DuplicateGroups()
    for batch in candidates.iter_batches(batch_size=None, batch_format="pyarrow"):
        groups.add(batch)
    decisions = resolve_duplicates(groups, cfg.dedup.threshold)
    log.info("[ingest] found %d duplicate(s) in %.1fs", decisions.num_rows, time.time() - started)
    return decisions


def _read_if_exists(fs: pafs.FileSystem, path: str, **kwargs: Any) -> Iterator[pa.RecordBatch]:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(**kwargs)


def _mark_duplicates(batch: pa.Table, decisions: dict[int, tuple[str, str]]) -> pa.Table:
    hits = [decisions.get(seq) for seq in batch["seq"].to_pylist()]
    if not any(hits):
        return batch
    corpus_columns = batch.select(CORPUS_SCHEMA.names).to_pylist()
    records = [json.dumps(row, ensure_ascii=False) if hit else None for row, hit in zip(corpus_columns, hits)]
    return (batch.append_column(REJECT_REASON, pa.array([h[0] if h else None for h in hits], pa.string()))
            .append_column(REJECT_DETAIL, pa.array([h[1] if h else None for h in hits], pa.string()))
            .append_column(REJECT_RECORD, pa.array(records, pa.string()))
            .append_column(REJECT_SOURCE, batch["origin"]))


def _dedup_phase(plan: list[ShardSpec], staging: ShardWriter, final: ShardWriter, decisions_path: str,
                 hook: ShardHook | None) -> int:
    written = 0
    for spec in plan:
        if final.is_done(spec.name):
            continue
        staged = staging.stats(spec.name)
        lo, hi = spec.index << _SEQ_BITS, (spec.index + 1) << _SEQ_BITS
        decisions_table = pq.read_table(decisions_path, filesystem=final.fs,
                                        filters=[("seq", ">=", lo), ("seq", "<", hi)])
        decisions = {seq: (reason, detail) for seq, reason, detail in zip(
            *(decisions_table[c].to_pylist() for c in ("seq", "reason", "detail")))}
        sink = final.open(spec.name, rows_in=staged.rows_in, one_to_one=False)
        try:
            sink.extra = dict(staged.extra)
            quarantine = posixpath.join(staging.root, "quarantine", f"{spec.name}.parquet")
            for batch in _read_if_exists(staging.fs, quarantine):
                sink.write_quarantine(pa.Table.from_batches([batch]))
            data = posixpath.join(staging.root, "data", f"{spec.name}.parquet")
            for batch in _read_if_exists(staging.fs, data, batch_size=8192):
                sink.write(_mark_duplicates(pa.Table.from_batches([batch]), decisions))
        except BaseException:
            sink.abort()
            raise
        _commit(sink, staged.kept + staged.rejected, "dedup", hook)
        written += 1
    return written
