"""The driver loop that streams actor output into stage shards (no Ray: a stand-in dataset):
shards commit as soon as all their rows are in, an interruption leaves committed shards intact and
aborts the rest, a rerun redoes only the uncommitted ones, and lost rows are an error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.data.shards import REJECT_REASON, ShardWriter
from babelforge.filter.teacher import PATH_COLUMN, STAT_PREFIX, stream_into_shards

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False)])


class FakeDataset:
    """Yields the rows of the given files in batches of 3, interleaving files like a pipeline would."""

    def __init__(self, files: list[str], drop_last: bool = False) -> None:
        tables = [pq.read_table(f).append_column(PATH_COLUMN, pa.array([f] * pq.read_metadata(f).num_rows))
                  for f in files]
        rows = pa.concat_tables(tables).to_pylist()
        rows.sort(key=lambda r: int(r["id"].split("-")[1]))       # interleave the shards
        self.rows = rows[:-1] if drop_last else rows

    def iter_batches(self, batch_format: str, batch_size: int | None):
        for start in range(0, len(self.rows), 3):
            batch = pa.Table.from_pylist(self.rows[start:start + 3])
            rejected = [None if int(r["id"].split("-")[1]) % 4 else "odd_one" for r in self.rows[start:start + 3]]
            yield (batch.append_column(REJECT_REASON, pa.array(rejected, pa.string()))
                   .append_column(f"{STAT_PREFIX}seen", pa.array([1] * batch.num_rows)))


def _inputs(tmp_path, sizes: list[int]) -> list[str]:
    files = []
    for number, size in enumerate(sizes):
        path = tmp_path / "in" / f"shard-{number}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": [f"{number}-{i}" for i in range(size)]}), path)
        files.append(str(path))
    return files


def test_interrupted_run_keeps_committed_shards_and_rerun_does_the_rest(tmp_path):
    files = _inputs(tmp_path, [4, 7, 0, 5])
    writer = ShardWriter(str(tmp_path / "out"), stage="test", schema=SCHEMA)
    made_for: list[list[str]] = []

    def make(pending):
        made_for.append(pending)
        return FakeDataset(pending)

    def crash_on_second(shard, stats):
        if len(writer.completed()) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_into_shards(writer, files, make, on_shard_committed=crash_on_second)
    done_first = writer.completed()
    assert len(done_first) == 2
    assert not list((tmp_path / "out" / "data").glob(".*.tmp"))   # open shards were aborted
    writer = ShardWriter(str(tmp_path / "out"), stage="test", schema=SCHEMA)
    assert stream_into_shards(writer, files, make) == 2
    assert sorted(made_for[1]) == sorted(f for f in files if f.split("/")[-1][:-8] not in done_first
                                         and pq.read_metadata(f).num_rows)
    summary = writer.summary()
    assert summary.shards == 4 and summary.resumed_shards == 2
    assert summary.rows_in == 16 == summary.kept + summary.quarantined["odd_one"]
    assert summary.extra["seen"] == 16
    assert writer.stats("shard-2").rows_in == 0                      # an empty input shard is committed too


def test_lost_rows_are_an_error_and_nothing_is_committed(tmp_path):
    files = _inputs(tmp_path, [5])
    writer = ShardWriter(str(tmp_path / "out"), stage="test", schema=SCHEMA)
    with pytest.raises(RuntimeError, match="rows were lost"):
        stream_into_shards(writer, files, lambda pending: FakeDataset(pending, drop_last=True))
    assert not writer.completed()
