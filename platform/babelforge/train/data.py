"""Training rows: ``TRAINING_SCHEMA`` parquet and bundled NTREX/Tatoeba data, mixed by weight, in a fixed order.

Sources (``data.sources`` of the train config), each with a ``weight``:

- ``{parquet: DIR}``: the mine stage's output (``DIR/data/*.parquet``, ``TRAINING_SCHEMA``), or any
  parquet file/directory with at least the non-nullable columns. ``optional: true`` skips a
  missing directory (e.g. a synthetic set that a CPU run did not produce).
- ``{ntrex: {pairs: [en-de, ...]}}``: bitext from the *train* side of the NTREX article split
  (:func:`babelforge.data.pairs.ntrex_pairs`), so held-out evaluation articles are never trained on.
- ``{tatoeba: {langs: [...]}}``: Tatoeba bitext minus the lines evaluation queries.
- ``{ntrex_passages: {langs: [...]}}``: monolingual sentence -> passage pairs from the *train*
  articles: the passages (windows of ``passage_sentences`` consecutive sentences of an article)
  that evaluation's monolingual NTREX task builds, each with one of its sentences (a stable
  choice) as the query. Bitext trains the ``query``/``passage`` prefixes on translations; these
  keep retrieval of a passage from one of its sentences in the mix.

**Translation groups** (``group``, see :mod:`babelforge.schema`) reach the rows of every source, for
the loss's exact false-negative masking: parquet keeps its own column (the mine stage copies the
pairs' groups; null where a file has none), ``ntrex`` and ``tatoeba`` rows keep their pairs' groups
(``ntrex:<line>``, ``tatoeba:<lang>:<line>``), and the ``ntrex_passages`` rows of one passage window
share ``ntrex-passage:<document>#<window>`` in every language. The passages of a window are
translations of each other, and each row's query is one of the window's sentences, so across
languages each row's positive answers the others' queries. Giving them the query sentence's
``ntrex:<line>`` instead would not do: the row's query sentence is chosen per language, so the
rows of one window would mostly get different groups. A row has one group, so a passage row is not
in the groups of the window's sentences: the bitext rows of those sentences still count its
passage as a negative if they share a batch, which ``group_by: task`` (the default) rules out.

:func:`build_training_dataset` makes one Ray Dataset of all sources (parquet is read lazily by
``ray.data.read_parquet``; bundled data is built on the driver). Every worker then reads the *whole*
dataset from ``ray.train.get_dataset_shard("train")`` and :func:`collect_rows` turns it into one
list in a canonical order: rows sorted by (source, id), duplicate ids dropped (the first source
wins), then each source weighted: ``weight < 1`` keeps a stable sample of that fraction,
``weight > 1`` repeats rows (``id#2``, ...) plus a stable sample for the fraction. The list is
therefore a function of the data and the seed only, whatever the Ray Data block order, which is
what makes the batch of step ``s`` the same on every worker and after every restart.

Every worker holds all rows in memory (text only; about 1 GB per million rows of ~300
characters), which suits fine-tuning sets; larger corpora need a sharded batch planner.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Iterable, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from babelforge.config import StrictModel
from babelforge.data.pairs import NtrexSettings, TatoebaSettings, ntrex_pairs, tatoeba_pairs
from babelforge.data.shards import list_parquet_files, resolve_filesystem
from babelforge.errors import DataFormatError
from babelforge.eval.bitext import (DEFAULT_HOLDOUT_FRACTION, DEFAULT_SPLIT_SEED, ntrex_monolingual_task,
                                    split_ntrex_lines)
from babelforge.eval.datasets import stable_sample
from babelforge.resources import NTREX_FILES, check_languages
from babelforge.schema import TRAINING_SCHEMA, require_columns
from babelforge.train.batching import ContrastiveBatch, ContrastiveBatcher, GlobalBatch

log = logging.getLogger(__name__)

__all__ = ["ParquetSource", "NtrexSource", "TatoebaSource", "NtrexPassageSettings", "NtrexPassagesSource",
           "TrainingSource", "SOURCE_COLUMN", "pairs_to_training", "conform_training", "ntrex_passage_table",
           "source_table", "build_training_dataset", "collect_rows", "weighted_rows", "StepPlan"]

SOURCE_COLUMN = "_source_index"  # position of a row's source in data.sources (weights, precedence)


class ParquetSource(StrictModel):
    """``TRAINING_SCHEMA`` parquet (a file or directory, local or any pyarrow URI)."""

    parquet: str
    weight: PositiveFloat = 1.0
    optional: bool = False


class NtrexSource(StrictModel):
    """NTREX bitext pairs from the training side of the article split."""

    ntrex: NtrexSettings
    weight: PositiveFloat = 1.0


class TatoebaSource(StrictModel):
    """Tatoeba bitext pairs, without the lines evaluation uses as queries."""

    tatoeba: TatoebaSettings
    weight: PositiveFloat = 1.0


class NtrexPassageSettings(StrictModel):
    """Languages and passage size of the sentence -> passage pairs (split settings as eval's ``ntrex_split``)."""

    langs: list[str] = Field(min_length=1)
    passage_sentences: PositiveInt = 4
    holdout_fraction: float = Field(DEFAULT_HOLDOUT_FRACTION, ge=0.0, lt=1.0)   # must match eval's ntrex_split
    split_seed: int = DEFAULT_SPLIT_SEED
    sample_seed: int = 0

    @field_validator("langs")
    @classmethod
    def _check_langs(cls, langs: list[str]) -> list[str]:
        return check_languages(langs, NTREX_FILES, "NTREX")


class NtrexPassagesSource(StrictModel):
    """Monolingual sentence -> passage pairs from the training side of the NTREX article split."""

    ntrex_passages: NtrexPassageSettings
    weight: PositiveFloat = 1.0


TrainingSource = Union[ParquetSource, NtrexSource, TatoebaSource, NtrexPassagesSource]

PASSAGE_INSTRUCTION = "Given a sentence, retrieve the passage it comes from"


def pairs_to_training(pairs: pa.Table) -> pa.Table:
    """``PAIR_SCHEMA``-shaped rows -> ``TRAINING_SCHEMA`` (a hard negative becomes the one negative).

    Shared columns are copied; training-only columns (teacher rank and score) are null.
    """
    negatives = pa.array([[hn] if hn else [] for hn in pairs.column("hard_negative").to_pylist()],
                         pa.list_(pa.string()))
    columns = [negatives if f.name == "negatives"
               else pairs.column(f.name).cast(f.type) if f.name in pairs.column_names
               else pa.nulls(pairs.num_rows, f.type) for f in TRAINING_SCHEMA]
    return pa.Table.from_arrays(columns, schema=TRAINING_SCHEMA)


def conform_training(table: pa.Table, what: str = "training rows") -> pa.Table:
    """Select and cast ``TRAINING_SCHEMA`` columns; missing nullable columns become nulls."""
    require_columns(table.column_names, TRAINING_SCHEMA, what)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in TRAINING_SCHEMA]
    return pa.Table.from_arrays(columns, schema=TRAINING_SCHEMA)


def _tag(table: pa.Table, index: int) -> pa.Table:
    return table.append_column(SOURCE_COLUMN, pa.array([index] * table.num_rows, pa.int32()))


def ntrex_passage_table(settings: NtrexPassageSettings) -> pa.Table:
    """One row per passage of the train articles: a stable choice of its sentences -> the passage.

    The rows of one window of an article share the group ``ntrex-passage:<document>#<window>`` in
    every language (see the module docstring).
    """
    lines = split_ntrex_lines(settings.holdout_fraction, settings.split_seed).train_lines
    rows = []
    for lang in settings.langs:
        task = ntrex_monolingual_task(lang, lines, passage_sentences=settings.passage_sentences)
        sentences_of: dict[str, list[str]] = {}
        for qid, relevant in task.qrels.items():  # a repeated sentence is relevant to each passage holding it
            sentences_of.setdefault(min(relevant), []).append(qid)
        for pid in sorted(sentences_of):
            qid = stable_sample(sentences_of[pid], 1, settings.sample_seed)[0]
            window = pid.split(":", 1)[1]  # pid = "<lang>:<document>#<window>"
            rows.append({"id": f"ntrex-passage-{pid}", "query": task.queries[qid], "positive": task.corpus[pid],
                         "negatives": [], "query_lang": lang, "positive_lang": lang, "task": "short_long",
                         "instruction": PASSAGE_INSTRUCTION, "source": "ntrex", "group": f"ntrex-passage:{window}"})
    return pa.Table.from_pylist(rows, schema=TRAINING_SCHEMA)


def source_table(source: NtrexSource | TatoebaSource | NtrexPassagesSource) -> pa.Table:
    """The ``TRAINING_SCHEMA`` rows of a bundled source."""
    if isinstance(source, NtrexPassagesSource):
        return ntrex_passage_table(source.ntrex_passages)
    if isinstance(source, NtrexSource):
        s = source.ntrex
        pairs = ntrex_pairs(s.pairs, holdout_fraction=s.holdout_fraction, split_seed=s.split_seed,
                            max_pairs=s.max_pairs, sample_seed=s.sample_seed)
    else:
        s = source.tatoeba
        pairs = tatoeba_pairs(s.langs, direction=s.direction, eval_queries=s.eval_queries, eval_seed=s.eval_seed,
                              max_pairs=s.max_pairs, sample_seed=s.sample_seed)
    return pairs_to_training(pairs)


def _conform_batch(batch: pa.Table, index: int, uri: str) -> pa.Table:
    return _tag(conform_training(batch, f"training parquet {uri}"), index)


def build_training_dataset(sources: Sequence[TrainingSource]):
    """One ``ray.data.Dataset`` of every source's rows, tagged with :data:`SOURCE_COLUMN`."""
    import ray.data

    parts = []
    for index, source in enumerate(sources):
        if isinstance(source, ParquetSource):
            files = list_parquet_files(source.parquet)
            if not files:
                if source.optional:
                    log.info("training source %d: no parquet under %s (optional, skipped)", index, source.parquet)
                    continue
                raise DataFormatError(f"data.sources[{index}]: no parquet file under {source.parquet}")
            filesystem = resolve_filesystem(source.parquet)[0] if "://" in source.parquet else None
            ds = ray.data.read_parquet(files, filesystem=filesystem)
            parts.append(ds.map_batches(_conform_batch, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs={"index": index, "uri": source.parquet}))
        else:
            parts.append(ray.data.from_arrow(_tag(source_table(source), index)))
    if not parts:
        raise DataFormatError("data.sources: every source is optional and none has data")
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Every worker reads the dataset once; per-worker progress bars would only clutter the job log.
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    return dataset


def _stable_key(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def weighted_rows(rows: Sequence[dict[str, Any]], weight: float, seed: int) -> list[dict[str, Any]]:
    """``rows`` repeated ``int(weight)`` times plus a stable sample of ``frac(weight) x len(rows)``.

    Repeats carry ids ``<id>#2``, ``<id>#3``... so every row of the epoch has a distinct id.
    """
    whole, fraction = divmod(weight, 1.0)
    out: list[dict[str, Any]] = []
    for copy in range(int(whole)):
        out.extend(rows if copy == 0 else ({**r, "id": f"{r['id']}#{copy + 1}"} for r in rows))
    extra = round(fraction * len(rows))
    if extra:
        chosen = set(sorted((r["id"] for r in rows), key=lambda i: _stable_key(seed, i))[:extra])
        suffix = f"#{int(whole) + 1}" if whole else ""
        out.extend({**r, "id": r["id"] + suffix} for r in rows if r["id"] in chosen)
    return out


def collect_rows(tables: Iterable[pa.Table], weights: Sequence[float], seed: int) -> list[dict[str, Any]]:
    """Training rows in canonical order (see the module docstring) from any arrangement of ``tables``."""
    parts = [t for t in tables if t.num_rows]
    if not parts:
        raise DataFormatError("no training rows: every source is empty")
    table = pa.concat_tables([t.select([*TRAINING_SCHEMA.names, SOURCE_COLUMN]) for t in parts])
    table = table.take(pc.sort_indices(table, sort_keys=[(SOURCE_COLUMN, "ascending"), ("id", "ascending")]))
    by_source: dict[int, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    duplicates: Counter[int] = Counter()
    for row in table.to_pylist():
        index = row.pop(SOURCE_COLUMN)
        if row["id"] in seen:
            duplicates[index] += 1
            continue
        seen.add(row["id"])
        by_source.setdefault(index, []).append(row)
    for index, count in sorted(duplicates.items()):
        log.warning("data.sources[%d]: dropped %d rows whose id an earlier source (or row) already had", index, count)
    rows: list[dict[str, Any]] = []
    for index in sorted(by_source):
        rows.extend(weighted_rows(by_source[index], weights[index], seed))
    return rows


class StepPlan:
    """The batches of each optimiser step, a pure function of (rows, batching seed, step).

    Step ``s`` (1-based) trains on positions ``(s-1)·k … s·k-1`` of the endless sequence of the
    batcher's epoch plans (``k`` = ``accumulation_steps``), so resuming at step ``s`` needs nothing
    but ``s``: no data-loader state is checkpointed.
    """

    def __init__(self, batcher: ContrastiveBatcher, accumulation_steps: int = 1) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be positive, got {accumulation_steps}")
        if batcher.steps_per_epoch == 0:
            raise DataFormatError(f"no batch of {batcher.config.batch_size} pairs can be formed from "
                                  f"{len(batcher.rows)} rows (drop_last and too few rows per group?)")
        self.batcher = batcher
        self.accumulation_steps = accumulation_steps
        self._epoch = -1
        self._plan: list[GlobalBatch] = []

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after ``step``."""
        return step * self.accumulation_steps / self.batcher.steps_per_epoch

    def batches(self, step: int) -> list[ContrastiveBatch]:
        """This worker's shards of the ``accumulation_steps`` batches of ``step``."""
        if step < 1:
            raise ValueError(f"steps are numbered from 1, got {step}")
        first = (step - 1) * self.accumulation_steps
        return [self._batch(position) for position in range(first, first + self.accumulation_steps)]

    def _batch(self, position: int) -> ContrastiveBatch:
        epoch, index = divmod(position, self.batcher.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.batcher.plan(epoch)
        return self.batcher.shard(self._plan[index], epoch, index)
