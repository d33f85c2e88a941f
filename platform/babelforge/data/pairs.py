"""(query, positive) pairs for filtering and mining, from synthesis output and from real bitext.

Every source becomes ``PAIR_SCHEMA`` rows (see :mod:`babelforge.schema`):

- **synthetic** (``SYNTHETIC_SCHEMA`` shards of the synth stage): query, positive, hard negative,
  task and instruction are copied. ``lang`` is the query's language; the positive is in the same
  language except for ``task == "bitext"``, whose positive is a translation. Its language is taken,
  in this order, from a ``positive_lang`` column (if the synth output carries one), from a
  ``lang`` written as ``"<query>-<positive>"`` (e.g. ``"de-en"``), or detected offline from the
  positive text (:func:`babelforge.data.langid.detect_language`; null when undetermined).
- **NTREX** (bundled, line-aligned news): for a language pair ``"en-de"``, query = English line
  ``i``, positive = German line ``i``, for the ``train`` lines of
  :func:`babelforge.eval.bitext.split_ntrex_lines` only, so no sentence of a held-out evaluation
  article is ever trained on (use the same ``holdout_fraction`` / ``seed`` as the eval config).
- **Tatoeba** (bundled, ``lang``-English): every line except those evaluation queries: eval's
  ``tatoeba_task(max_queries=M, seed=S)`` queries the lines ``stable_sample(lines, M, S)``, and
  exactly those are excluded (eval: ``max_queries: 200``, ``sample_seed: 0``). Evaluation still
  uses every line as a retrieval candidate, so the English sides of the training lines are
  distractors there; use ``eval_queries: null`` to exclude all of Tatoeba's lines from training.

Bitext pairs have ``task = "bitext"`` and the instruction of the synth bitext task, e.g. "Given a
sentence in English, retrieve its translation in German"::

    >>> table = ntrex_pairs(["en-de"], max_pairs=2)
    >>> table.column("id").to_pylist()                                      # doctest: +SKIP
    ['ntrex-en-de-0003', 'ntrex-en-de-1450']
    >>> table.column("instruction")[0].as_py()
    'Given a sentence in English, retrieve its translation in German'

**Translation groups** (the ``group`` column, see :mod:`babelforge.schema`): texts of one group
say the same thing, so filtering does not rank them against each other and mining never makes
one a negative for another.

- NTREX is multi-parallel: line ``i`` of every language is the same sentence, so every pair of
  line ``i`` (any language pair, either direction) has group ``"ntrex:<i>"``.
- Tatoeba: group ``"tatoeba:<lang>:<i>"``. Each language file is aligned with its own English
  file, so the same English sentence in two language files may get two groups (the groups are
  then incomplete, never wrong).
- Synthetic pairs: null. Examples generated from the same seed passage share a topic, not their
  content (and the LLM's hard negative is deliberately close to the seed), so the seed id would
  wrongly forbid the negatives synthesis aims for.
- ``pairs:`` parquet: the file's own ``group`` column, null where it has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, PositiveInt, field_validator

from babelforge.config import StrictModel
from babelforge.data.langid import detect_language
from babelforge.data.shards import list_parquet_files, resolve_filesystem
from babelforge.errors import DataFormatError
from babelforge.eval.bitext import DEFAULT_HOLDOUT_FRACTION, DEFAULT_SPLIT_SEED, read_ntrex, split_ntrex_lines
from babelforge.eval.datasets import stable_sample
from babelforge.resources import LANGUAGE_NAMES, NTREX_FILES, TATOEBA_CODES, check_languages, tatoeba_files
from babelforge.schema import PAIR_SCHEMA, SYNTHETIC_SCHEMA, require_columns

__all__ = ["PAIRS_INPUT_SCHEMA", "BITEXT_INSTRUCTION", "SyntheticPairs", "PairFiles", "NtrexPairs", "TatoebaPairs",
           "PairSource", "synthetic_to_pairs", "ntrex_pairs", "tatoeba_pairs", "iter_pair_tables",
           "tatoeba_eval_lines", "pair_record"]

BITEXT_INSTRUCTION = "Given a sentence in {query_language}, retrieve its translation in {positive_language}"

# PAIR_SCHEMA with every column nullable: pairs are written as read, and the filter stage
# quarantines the ones missing a required field (with the raw record) instead of failing.
PAIRS_INPUT_SCHEMA = pa.schema([f.with_nullable(True) for f in PAIR_SCHEMA])


def _language_pair(value: str, known: Sequence[str], corpus: str) -> str:
    parts = value.split("-")
    if len(parts) != 2 or parts[0] == parts[1] or not all(p in known for p in parts):
        raise ValueError(f"{value!r}: expected QUERY-POSITIVE with two different {corpus} languages "
                         f"(e.g. en-de); available: {', '.join(known)}")
    return value


class SyntheticPairs(StrictModel):
    """Pairs from the synth stage's output directory (``SYNTHETIC_SCHEMA`` parquet)."""

    synthetic: str


class PairFiles(StrictModel):
    """Pairs already in ``PAIR_SCHEMA`` (a parquet file or directory)."""

    pairs: str


class NtrexSettings(StrictModel):
    pairs: list[str] = Field(min_length=1)   # QUERY-POSITIVE, e.g. [en-de, de-en]
    holdout_fraction: float = Field(DEFAULT_HOLDOUT_FRACTION, ge=0.0, lt=1.0)   # must match eval's ntrex_split
    split_seed: int = DEFAULT_SPLIT_SEED
    max_pairs: PositiveInt | None = None     # per language pair: a stable sample of the train lines
    sample_seed: int = 0

    @field_validator("pairs")
    @classmethod
    def _check_pairs(cls, pairs: list[str]) -> list[str]:
        return [_language_pair(p, list(NTREX_FILES), "NTREX") for p in pairs]


class NtrexPairs(StrictModel):
    """Bitext pairs from the training side of the bundled NTREX-128 article split."""

    ntrex: NtrexSettings


class TatoebaSettings(StrictModel):
    langs: list[str] = Field(min_length=1)
    direction: Literal["to-en", "from-en", "both"] = "both"
    eval_queries: PositiveInt | None = 200   # eval's max_queries; null: every line is held out
    eval_seed: int = 0                       # eval's sample_seed
    max_pairs: PositiveInt | None = None     # per language and direction
    sample_seed: int = 0

    @field_validator("langs")
    @classmethod
    def _check_langs(cls, langs: list[str]) -> list[str]:
        return check_languages(langs, TATOEBA_CODES, "Tatoeba")


class TatoebaPairs(StrictModel):
    """Bitext pairs from the bundled Tatoeba sets, minus the lines evaluation queries."""

    tatoeba: TatoebaSettings


PairSource = Union[SyntheticPairs, PairFiles, NtrexPairs, TatoebaPairs]


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _bitext_positive_lang(lang: str | None, positive: str | None, declared: str | None) -> str | None:
    if declared:
        return declared
    if lang and "-" in lang:
        return lang.split("-", 1)[1]
    return detect_language(positive)[0] if positive else None


def synthetic_to_pairs(table: pa.Table) -> pa.Table:
    """``SYNTHETIC_SCHEMA`` rows -> ``PAIRS_INPUT_SCHEMA`` rows (one per input row, nulls kept)."""
    require_columns(table.column_names, SYNTHETIC_SCHEMA, "synthetic pairs")
    langs, tasks, positives = _column(table, "lang"), _column(table, "task"), _column(table, "positive")
    declared = _column(table, "positive_lang")
    query_langs, positive_langs = [], []
    for lang, task, positive, positive_lang in zip(langs, tasks, positives, declared):
        if task == "bitext":
            query_langs.append(lang.split("-", 1)[0] if lang else None)
            positive_langs.append(_bitext_positive_lang(lang, positive, positive_lang))
        else:
            query_langs.append(lang)
            positive_langs.append(positive_lang or lang)
    return pa.table({
        "id": table.column("id"), "query": table.column("query"), "positive": table.column("positive"),
        "hard_negative": _column(table, "hard_negative"), "query_lang": query_langs, "positive_lang": positive_langs,
        "task": tasks, "instruction": _column(table, "instruction"),
        "source": ["synthetic"] * table.num_rows, "group": pa.nulls(table.num_rows, pa.string()),
    }, schema=PAIRS_INPUT_SCHEMA)


def _bitext_table(source: str, query_lang: str, positive_lang: str, lines: Sequence[int], queries: Sequence[str],
                  positives: Sequence[str], group_prefix: str) -> pa.Table:
    """Pairs ``queries[i] -> positives[i]`` for ``i`` in ``lines``, in group ``<group_prefix><i>``."""
    instruction = BITEXT_INSTRUCTION.format(query_language=LANGUAGE_NAMES[query_lang],
                                            positive_language=LANGUAGE_NAMES[positive_lang])
    n = len(lines)
    return pa.table({
        "id": [f"{source}-{query_lang}-{positive_lang}-{i:04d}" for i in lines],
        "query": [queries[i] for i in lines], "positive": [positives[i] for i in lines],
        "hard_negative": pa.nulls(n, pa.string()), "query_lang": [query_lang] * n,
        "positive_lang": [positive_lang] * n, "task": ["bitext"] * n, "instruction": [instruction] * n,
        "source": [source] * n, "group": [f"{group_prefix}{i}" for i in lines],
    }, schema=PAIRS_INPUT_SCHEMA)


def _sample_lines(lines: Sequence[int], max_pairs: int | None, seed: int) -> list[int]:
    if max_pairs is None:
        return list(lines)
    return [int(i) for i in stable_sample([str(i) for i in lines], max_pairs, seed)]


def ntrex_pairs(lang_pairs: Sequence[str], *, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                split_seed: int = DEFAULT_SPLIT_SEED, max_pairs: int | None = None, sample_seed: int = 0) -> pa.Table:
    """NTREX bitext pairs (``"en-de"``: English query, German positive) from the train lines only; the
    pairs of line ``i`` (in every language pair) share the group ``"ntrex:<i>"``."""
    train_lines = split_ntrex_lines(holdout_fraction, split_seed).train_lines
    lines = _sample_lines(train_lines, max_pairs, sample_seed)
    tables = []
    for pair in lang_pairs:
        query_lang, positive_lang = _language_pair(pair, list(NTREX_FILES), "NTREX").split("-")
        tables.append(_bitext_table("ntrex", query_lang, positive_lang, lines, read_ntrex(query_lang),
                                    read_ntrex(positive_lang), group_prefix="ntrex:"))
    return pa.concat_tables(tables)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def tatoeba_eval_lines(n_lines: int, eval_queries: int | None, eval_seed: int) -> set[int]:
    """The Tatoeba lines ``babelforge eval`` uses as queries (all lines when ``eval_queries`` is None)."""
    lines = [str(i) for i in range(n_lines)]
    return {int(i) for i in (stable_sample(lines, eval_queries, eval_seed) if eval_queries else lines)}


def tatoeba_pairs(langs: Sequence[str], *, direction: Literal["to-en", "from-en", "both"] = "both",
                  eval_queries: int | None = 200, eval_seed: int = 0, max_pairs: int | None = None,
                  sample_seed: int = 0) -> pa.Table:
    """Tatoeba bitext pairs of ``lang``-English, without the lines evaluation queries; both directions
    of line ``i`` of ``lang`` share the group ``"tatoeba:<lang>:<i>"``."""
    tables = []
    for lang in langs:
        foreign_path, english_path = tatoeba_files(lang)
        foreign, english = _read_lines(foreign_path), _read_lines(english_path)
        if len(foreign) != len(english):
            raise DataFormatError(f"{english_path}: {len(english)} lines, but {foreign_path} has {len(foreign)}")
        held_out = tatoeba_eval_lines(len(foreign), eval_queries, eval_seed)
        lines = _sample_lines([i for i in range(len(foreign)) if i not in held_out], max_pairs, sample_seed)
        group_prefix = f"tatoeba:{lang}:"
        if direction in ("to-en", "both"):
            tables.append(_bitext_table("tatoeba", lang, "en", lines, foreign, english, group_prefix))
        if direction in ("from-en", "both"):
            tables.append(_bitext_table("tatoeba", "en", lang, lines, english, foreign, group_prefix))
    return pa.concat_tables(tables) if tables else PAIRS_INPUT_SCHEMA.empty_table()


def _parquet_batches(uri: str, what: str, batch_rows: int) -> Iterator[pa.Table]:
    files = list_parquet_files(uri)
    if not files:
        raise DataFormatError(f"{what} {uri}: no parquet file found")
    fs, _ = resolve_filesystem(uri)
    for path in files:
        parquet = pq.ParquetFile(path, filesystem=fs)
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])


def _conform_pairs(table: pa.Table, uri: str) -> pa.Table:
    require_columns(table.column_names, PAIR_SCHEMA, f"pairs {uri}")
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in PAIRS_INPUT_SCHEMA]
    return pa.Table.from_arrays(columns, schema=PAIRS_INPUT_SCHEMA)


def iter_pair_tables(source: PairSource, batch_rows: int = 10_000) -> Iterator[pa.Table]:
    """``PAIRS_INPUT_SCHEMA`` tables of one source, streamed (parquet sources batch by batch)."""
    if isinstance(source, SyntheticPairs):
        for batch in _parquet_batches(source.synthetic, "synthetic pairs", batch_rows):
            yield synthetic_to_pairs(batch)
    elif isinstance(source, PairFiles):
        for batch in _parquet_batches(source.pairs, "pairs", batch_rows):
            yield _conform_pairs(batch, source.pairs)
    elif isinstance(source, NtrexPairs):
        s = source.ntrex
        yield ntrex_pairs(s.pairs, holdout_fraction=s.holdout_fraction, split_seed=s.split_seed,
                          max_pairs=s.max_pairs, sample_seed=s.sample_seed)
    else:
        s = source.tatoeba
        yield tatoeba_pairs(s.langs, direction=s.direction, eval_queries=s.eval_queries, eval_seed=s.eval_seed,
                            max_pairs=s.max_pairs, sample_seed=s.sample_seed)


def pair_record(row: dict) -> str:
    """A pair as the JSON ``record`` of a quarantine row."""
    return json.dumps({f.name: row.get(f.name) for f in PAIR_SCHEMA}, ensure_ascii=False)
