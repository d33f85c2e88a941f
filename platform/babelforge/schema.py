"""Arrow schemas of the datasets that flow between pipeline stages.

Stages agree on these column names; every stage validates its input against the schema it
consumes and names the missing or mistyped column when it does not match.

- ``CORPUS_SCHEMA``: ingested documents (output of ``ingest``; seeds for synthesis; the search
  pool for filtering and mining).
- ``SYNTHETIC_SCHEMA``: one generated (query, positive, hard negative) example per row.
- ``PAIR_SCHEMA``: a (query, positive) pair with provenance, the input of filtering and mining
  (synthetic examples and real bitext both become pairs).
- ``TRAINING_SCHEMA``: training-ready rows (output of ``mine``, input of ``train``).
- ``QUARANTINE_SCHEMA``: a rejected record, the stage that rejected it and why.

**Translation groups.** ``PAIR_SCHEMA`` and ``TRAINING_SCHEMA`` carry an optional ``group``: texts
sharing a group express the same content (e.g. all translations of one NTREX line,
``"ntrex:<line>"``), so none of them may be a negative for another. A pair's group covers its
query and its positive. Filtering does not count the other texts of the pair's group as
competitors of the positive, mining never picks them as negatives, and the training loss masks
them among a query's in-batch candidates; this is exact knowledge from the data, where text
equality and the score-ratio guard only approximate it. Null means "no known alternatives"
(synthetic pairs, see :mod:`babelforge.data.pairs`).
"""

from __future__ import annotations

import pyarrow as pa

from babelforge.errors import DataFormatError

__all__ = ["CORPUS_SCHEMA", "SYNTHETIC_SCHEMA", "PAIR_SCHEMA", "TRAINING_SCHEMA", "QUARANTINE_SCHEMA",
           "TASK_TYPES", "require_columns"]

# Task types of the synthesis recipe (KaLM-Embedding / "Retrofitting": task diversity matters most).
TASK_TYPES = ("short_long", "long_long", "short_short", "qa", "bitext")

CORPUS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("lang", pa.string()),          # ISO 639-1, detected offline when the source lacks it
    pa.field("source", pa.string()),        # file or dataset the row came from
    pa.field("meta", pa.string()),          # JSON object with anything else the source carried
])

SYNTHETIC_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("positive", pa.string(), nullable=False),
    pa.field("hard_negative", pa.string()),
    pa.field("lang", pa.string()),          # language of the query (and of the positive, except bitext)
    pa.field("positive_lang", pa.string()),  # language of the positive: differs from `lang` for bitext
    pa.field("task", pa.string()),
    pa.field("instruction", pa.string()),   # the retrieval instruction the query is written for
    pa.field("persona", pa.string()),
    pa.field("seed_id", pa.string()),       # corpus id of the seed passage
    pa.field("backend", pa.string()),
    pa.field("model", pa.string()),
])

PAIR_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("positive", pa.string(), nullable=False),
    pa.field("hard_negative", pa.string()),  # a synthetic hard negative, if the source had one
    pa.field("query_lang", pa.string()),
    pa.field("positive_lang", pa.string()),
    pa.field("task", pa.string()),
    pa.field("instruction", pa.string()),
    pa.field("source", pa.string()),         # "synthetic", "ntrex", "tatoeba", ...
    pa.field("group", pa.string()),          # translation group: texts sharing it are never negatives for each other
])

TRAINING_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("positive", pa.string(), nullable=False),
    pa.field("negatives", pa.list_(pa.string())),
    pa.field("query_lang", pa.string()),
    pa.field("positive_lang", pa.string()),
    pa.field("task", pa.string()),
    pa.field("instruction", pa.string()),
    pa.field("source", pa.string()),
    pa.field("group", pa.string()),          # translation group of the pair (see the module docstring)
    pa.field("positive_rank", pa.int32()),   # teacher rank of the positive (1 = top), from filtering
    pa.field("positive_score", pa.float32()),
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),   # a short machine-readable code, e.g. "empty_text"
    pa.field("detail", pa.string()),                   # human-readable explanation naming the field
    pa.field("source", pa.string()),                   # file (and line) the record came from
    pa.field("record", pa.string()),                   # the raw record, as JSON or raw text
])


def require_columns(columns: list[str] | tuple[str, ...], schema: pa.Schema, what: str) -> None:
    """Raise :class:`DataFormatError` naming the columns of ``schema`` missing from ``columns``."""
    missing = [f.name for f in schema if not f.nullable and f.name not in columns]
    if missing:
        raise DataFormatError(f"{what}: missing required column(s) {missing}; found {list(columns)}")
