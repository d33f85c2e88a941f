"""Resumable, sharded stage outputs with a quarantine and a manifest.

Every data stage (ingest, synth, filter, mine) processes its input shard by shard. A shard's rows
stream through a Ray Data pipeline; the driver routes each result row either to the shard's
output or to its quarantine (rows whose ``_reject_reason`` column is set) and commits the shard
atomically once its pipeline has finished. A rerun skips committed shards, so an interrupted stage
resumes where it stopped and nothing is processed twice.

Layout under ``output_dir`` (any local path or pyarrow/fsspec URI such as ``s3://bucket/run``)::

    data/<shard>.parquet          kept rows (the stage's schema)
    quarantine/<shard>.parquet    rejected rows (QUARANTINE_SCHEMA: stage, reason, detail, source, record)
    _done/<shard>.json            commit marker with the shard's counts (written last)
    manifest.json                 totals over all committed shards

Accounting is exact: for every shard ``rows_in == kept + sum(quarantined.values())`` unless the
stage declares that one input row may yield several outputs (e.g. ingest splitting long texts).

    >>> writer = ShardWriter("/tmp/run/ingest", stage="ingest", schema=CORPUS_SCHEMA)   # doctest: +SKIP
    >>> with writer.open("part-00000", rows_in=3) as sink:                               # doctest: +SKIP
    ...     sink.write(table_with_reject_columns)
    >>> writer.summary().kept                                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelforge.observability import record_shard_commit
from babelforge.schema import QUARANTINE_SCHEMA

log = logging.getLogger(__name__)

__all__ = ["ShardWriter", "ShardSink", "ShardStats", "StageSummary", "REJECT_REASON", "REJECT_DETAIL",
           "REJECT_RECORD", "REJECT_SOURCE", "resolve_filesystem", "list_parquet_files"]

# Columns a stage's Ray Data function adds to route a row to the quarantine.
REJECT_REASON = "_reject_reason"   # empty / null = keep the row
REJECT_DETAIL = "_reject_detail"
REJECT_RECORD = "_reject_record"   # raw record (JSON or text) so nothing is lost
REJECT_SOURCE = "_reject_source"   # file:line or upstream id the record came from
_REJECT_COLUMNS = (REJECT_REASON, REJECT_DETAIL, REJECT_RECORD, REJECT_SOURCE)


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def list_parquet_files(uri: str) -> list[str]:
    """Sorted parquet files under a directory (or the file itself), as paths on its filesystem."""
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(i.path for i in fs.get_file_info(selector)
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and "/_" not in i.path[len(path):] and "/quarantine/" not in i.path[len(path):])


@dataclass
class ShardStats:
    """Counts of one committed shard."""

    shard: str
    rows_in: int
    kept: int
    quarantined: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.quarantined.values())


@dataclass
class StageSummary:
    """Totals over the committed shards of a stage."""

    stage: str
    shards: int
    rows_in: int
    kept: int
    quarantined: dict[str, int]
    resumed_shards: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        resumed = f" ({self.resumed_shards} resumed from an earlier run)" if self.resumed_shards else ""
        return (f"[{self.stage}] shards={self.shards}{resumed} rows in={self.rows_in} kept={self.kept} "
                f"quarantined={sum(self.quarantined.values())} ({reasons})")


class ShardSink:
    """Collects one shard's rows and commits them atomically (use as a context manager)."""

    def __init__(self, writer: "ShardWriter", shard: str, rows_in: int | None, one_to_one: bool) -> None:
        self._writer = writer
        self.shard = shard
        self.rows_in = rows_in
        self.one_to_one = one_to_one
        self.kept = 0
        self.quarantined: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self._started = time.time()
        token = uuid.uuid4().hex[:8]
        fs, root = writer.fs, writer.root
        self._tmp_data = posixpath.join(root, "data", f".{shard}.{token}.tmp")
        self._tmp_quarantine = posixpath.join(root, "quarantine", f".{shard}.{token}.tmp")
        self._data_writer: pq.ParquetWriter | None = None
        self._quarantine_writer: pq.ParquetWriter | None = None
        self._fs = fs

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, table: pa.Table) -> None:
        """Route rows: those with a non-empty ``_reject_reason`` go to quarantine, the rest are kept."""
        if table.num_rows == 0:
            return
        if REJECT_REASON in table.column_names:
            reasons = pc.fill_null(table[REJECT_REASON].cast(pa.string()), "")
            rejected_mask = pc.not_equal(reasons, "")
            self.write_quarantine(_to_quarantine(table.filter(rejected_mask), self._writer.stage))
            table = table.filter(pc.invert(rejected_mask))
        if table.num_rows:
            self.write_kept(table)

    def consume(self, ds: Any, batch_size: int = 1024) -> None:
        """Stream a Ray Dataset's rows into this shard (only one batch is held in the driver)."""
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            self.write(batch)

    def write_kept(self, table: pa.Table) -> None:
        table = _conform(table.drop_columns([c for c in _REJECT_COLUMNS if c in table.column_names]),
                         self._writer.schema)
        if self._data_writer is None:
            self._data_writer = pq.ParquetWriter(self._tmp_data, self._writer.schema, filesystem=self._fs)
        self._data_writer.write_table(table)
        self.kept += table.num_rows

    def write_quarantine(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = _conform(table, QUARANTINE_SCHEMA)
        if self._quarantine_writer is None:
            self._quarantine_writer = pq.ParquetWriter(self._tmp_quarantine, QUARANTINE_SCHEMA, filesystem=self._fs)
        self._quarantine_writer.write_table(table)
        self.quarantined.update(Counter(table["reason"].to_pylist()))

    def commit(self) -> ShardStats:
        rejected = sum(self.quarantined.values())
        if self.rows_in is None:
            self.rows_in = self.kept + rejected
        if self.one_to_one and self.kept + rejected != self.rows_in:
            self.abort()
            raise RuntimeError(f"shard {self.shard}: {self.rows_in} rows in but {self.kept} kept + {rejected} "
                               "quarantined; a row was lost or duplicated")
        w = self._writer
        for tmp, sub, pqw in ((self._tmp_data, "data", self._data_writer),
                              (self._tmp_quarantine, "quarantine", self._quarantine_writer)):
            final = posixpath.join(w.root, sub, f"{self.shard}.parquet")
            if pqw is None:
                _delete_if_exists(self._fs, final)  # stale file from an aborted earlier attempt
                continue
            pqw.close()
            _delete_if_exists(self._fs, final)
            self._fs.move(tmp, final)
        stats = ShardStats(shard=self.shard, rows_in=int(self.rows_in), kept=self.kept,
                           quarantined=dict(self.quarantined), seconds=round(time.time() - self._started, 3),
                           extra=self.extra)
        w._write_json(posixpath.join(w.root, "_done", f"{self.shard}.json"), asdict(stats))
        w._commit(stats)
        return stats

    def abort(self) -> None:
        for pqw, tmp in ((self._data_writer, self._tmp_data), (self._quarantine_writer, self._tmp_quarantine)):
            if pqw is not None:
                try:
                    pqw.close()
                except Exception:  # the writer may already be broken; cleanup must not mask the error
                    pass
            _delete_if_exists(self._fs, tmp)


class ShardWriter:
    """Output of one stage: committed shards, their quarantine, and the manifest."""

    def __init__(self, output_dir: str, stage: str, schema: pa.Schema) -> None:
        self.output_dir = output_dir
        self.stage = stage
        self.schema = schema
        self.fs, self.root = resolve_filesystem(output_dir)
        for sub in ("data", "quarantine", "_done"):
            self.fs.create_dir(posixpath.join(self.root, sub), recursive=True)
        self._stats: dict[str, ShardStats] = self._load_done()
        self._resumed = set(self._stats)
        self._started = time.time()

    def _load_done(self) -> dict[str, ShardStats]:
        selector = pafs.FileSelector(posixpath.join(self.root, "_done"), allow_not_found=True)
        stats: dict[str, ShardStats] = {}
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(".json"):
                continue
            with self.fs.open_input_stream(info.path) as f:
                data = json.loads(f.read().decode("utf-8"))
            stats[data["shard"]] = ShardStats(**data)
        return stats

    def is_done(self, shard: str) -> bool:
        return shard in self._stats

    def completed(self) -> set[str]:
        return set(self._stats)

    def stats(self, shard: str) -> ShardStats:
        """Counts of a committed shard."""
        return self._stats[shard]

    def open(self, shard: str, rows_in: int | None = None, one_to_one: bool = True) -> ShardSink:
        if "/" in shard or shard.startswith((".", "_")):
            raise ValueError(f"invalid shard name {shard!r}")
        return ShardSink(self, shard, rows_in, one_to_one)

    def data_files(self) -> list[str]:
        """Committed data files as URIs/paths readable by ``ray.data.read_parquet``."""
        prefix = self.output_dir.split("://", 1)[0] + "://" if "://" in self.output_dir else ""
        paths = [posixpath.join(self.root, "data", f"{s}.parquet") for s in sorted(self._stats)
                 if self._stats[s].kept]
        return [prefix + p if prefix else p for p in paths]

    def summary(self) -> StageSummary:
        quarantined: Counter[str] = Counter()
        extra: Counter[str] = Counter()
        for s in self._stats.values():
            quarantined.update(s.quarantined)
            extra.update({k: v for k, v in s.extra.items() if isinstance(v, (int, float))})
        return StageSummary(stage=self.stage, shards=len(self._stats),
                            rows_in=sum(s.rows_in for s in self._stats.values()),
                            kept=sum(s.kept for s in self._stats.values()), quarantined=dict(quarantined),
                            resumed_shards=len(self._resumed), seconds=round(time.time() - self._started, 3),
                            extra=dict(extra))

    def _commit(self, stats: ShardStats) -> None:
        self._stats[stats.shard] = stats
        summary = asdict(self.summary())
        summary["shards_detail"] = [asdict(s) for _, s in sorted(self._stats.items())]
        self._write_json(posixpath.join(self.root, "manifest.json"), summary)
        record_shard_commit(self.stage, self.output_dir, stats)   # Prometheus counters (no-op without Ray)
        log.info("[%s] committed %s: %d in, %d kept, %d quarantined", self.stage, stats.shard, stats.rows_in,
                 stats.kept, stats.rejected)

    def _write_json(self, path: str, payload: dict[str, Any]) -> None:
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(payload, indent=2, ensure_ascii=False).encode("utf-8"))
        _delete_if_exists(self.fs, path)
        self.fs.move(tmp, path)

    def iter_quarantine(self) -> Iterator[dict[str, Any]]:
        """All quarantined records of committed shards (for reports and tests)."""
        for shard in sorted(self._stats):
            path = posixpath.join(self.root, "quarantine", f"{shard}.parquet")
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                yield from pq.read_table(path, filesystem=self.fs).to_pylist()


def _delete_if_exists(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _to_quarantine(rejected: pa.Table, stage: str) -> pa.Table:
    n = rejected.num_rows

    def col(name: str) -> pa.Array:
        if name in rejected.column_names:
            return pc.fill_null(rejected[name].cast(pa.string()), "").combine_chunks()
        return pa.array([""] * n, pa.string())

    record = col(REJECT_RECORD)
    if REJECT_RECORD not in rejected.column_names:
        payload = rejected.drop_columns([c for c in _REJECT_COLUMNS if c in rejected.column_names])
        record = pa.array([json.dumps(r, ensure_ascii=False, default=str) for r in payload.to_pylist()], pa.string())
    return pa.table({"stage": pa.array([stage] * n, pa.string()), "reason": col(REJECT_REASON),
                     "detail": col(REJECT_DETAIL), "source": col(REJECT_SOURCE), "record": record},
                    schema=QUARANTINE_SCHEMA)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table`` to ``schema``; missing nullable columns become nulls."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"output is missing required column {f.name!r} (has {table.column_names})")
    return pa.Table.from_arrays(columns, schema=schema)
