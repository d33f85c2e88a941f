"""Sharded stage outputs: exact accounting, quarantine routing, atomic commit and resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.data.shards import REJECT_DETAIL, REJECT_REASON, ShardWriter, list_parquet_files
from babelforge.schema import CORPUS_SCHEMA


def _batch(ids, reasons):
    return pa.table({"id": ids, "text": [f"text {i}" for i in ids], "lang": ["en"] * len(ids),
                     REJECT_REASON: reasons, REJECT_DETAIL: [f"field text: {r}" if r else None for r in reasons]})


def test_rows_are_routed_and_counted(tmp_path):
    writer = ShardWriter(str(tmp_path / "out"), stage="ingest", schema=CORPUS_SCHEMA)
    with writer.open("part-0", rows_in=5) as sink:
        sink.write(_batch(["a", "b", "c"], [None, "empty_text", ""]))
        sink.write(_batch(["d", "e"], ["too_long", None]))
    summary = writer.summary()
    assert (summary.rows_in, summary.kept, summary.quarantined) == (5, 3, {"empty_text": 1, "too_long": 1})
    kept = pq.read_table(tmp_path / "out" / "data" / "part-0.parquet")
    assert kept.schema == CORPUS_SCHEMA and kept["id"].to_pylist() == ["a", "c", "e"]
    quarantined = list(writer.iter_quarantine())
    assert [json.loads(q["record"])["id"] for q in quarantined] == ["b", "d"]
    assert quarantined[0]["stage"] == "ingest" and quarantined[0]["detail"] == "field text: empty_text"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows_in"] == 5 and manifest["kept"] == 3
    assert list_parquet_files(str(tmp_path / "out")) == [str(tmp_path / "out" / "data" / "part-0.parquet")]


def test_lost_rows_fail_the_commit_and_leave_no_output(tmp_path):
    writer = ShardWriter(str(tmp_path / "out"), stage="synth", schema=CORPUS_SCHEMA)
    with pytest.raises(RuntimeError, match="4 rows in but 2 kept \\+ 1 quarantined"):
        with writer.open("part-0", rows_in=4) as sink:
            sink.write(_batch(["a", "b", "c"], [None, "bad_json", None]))
    assert not writer.is_done("part-0")
    assert not list((tmp_path / "out" / "data").iterdir())


def test_failure_inside_a_shard_aborts_it_and_a_rerun_resumes(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(out, stage="ingest", schema=CORPUS_SCHEMA)
    with writer.open("part-0", rows_in=1) as sink:
        sink.write(_batch(["a"], [None]))
    with pytest.raises(KeyboardInterrupt):
        with writer.open("part-1", rows_in=2) as sink:
            sink.write(_batch(["b"], [None]))
            raise KeyboardInterrupt  # the job is killed mid-shard
    rerun = ShardWriter(out, stage="ingest", schema=CORPUS_SCHEMA)
    assert rerun.completed() == {"part-0"}
    with rerun.open("part-1", rows_in=2) as sink:
        sink.write(_batch(["b", "c"], [None, None]))
    summary = rerun.summary()
    assert summary.resumed_shards == 1 and summary.rows_in == 3 and summary.kept == 3
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["part-0.parquet", "part-1.parquet"]


def test_missing_required_column_is_named(tmp_path):
    writer = ShardWriter(str(tmp_path / "out"), stage="ingest", schema=CORPUS_SCHEMA)
    with pytest.raises(ValueError, match="missing required column 'text'"):
        with writer.open("part-0", rows_in=1) as sink:
            sink.write(pa.table({"id": ["a"]}))
