"""Configuration of the ingest stage (``jobs/configs/ingest.yaml``).

A config lists the sources to read and how to clean them; every key is validated, so a typo or a
bad value fails before any data is read, with a message naming the key::

    >>> cfg = IngestConfig.model_validate({
    ...     "output_dir": "/tmp/run/ingest",
    ...     "sources": [{"bundled": "ntrex", "languages": ["de", "fr"]},
    ...                 {"path": "s3://bucket/web/*.jsonl.gz", "lang_field": "language", "meta_fields": ["url"]}],
    ...     "max_chars": 1000, "overlong": "split"})
    >>> cfg.dedup.threshold
    0.85

Sources are either ``bundled`` corpora (``ntrex``: one plain-text file per language; ``tatoeba``:
a foreign and an English file per language pair) or a ``path``: a file, a directory or a glob,
local or any pyarrow/fsspec URI. ``format: auto`` infers the format of each file from its extension
(``.jsonl``/``.ndjson``/``.json``, ``.parquet``/``.pq``, ``.txt``/``.text``; optionally compressed
``.gz``/``.bz2``/``.zst``/``.lz4``).

``decontaminate`` keeps evaluation text out of the corpus: records whose text equals a held-out NTREX
line or a line of ``text_files`` (up to Unicode normalisation, case and whitespace) are quarantined as
``eval_contamination`` (see :mod:`babelforge.data.decontaminate`)::

    >>> IngestConfig.model_validate({"output_dir": "/tmp/run/ingest", "sources": [{"bundled": "ntrex"}],
    ...                              "decontaminate": {"ntrex_heldout": True}}).decontaminate.enabled
    True
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from babelforge.config import StrictModel
from babelforge.data.langid import to_iso639_1
from babelforge.resources import NTREX_FILES, TATOEBA_CODES

__all__ = ["IngestConfig", "SourceConfig", "DedupConfig", "LangIdConfig", "DecontaminateConfig", "RayOptions",
           "BUNDLED_LANGUAGES"]

SourceFormat = Literal["auto", "jsonl", "parquet", "text"]
RESERVED_META_KEYS = ("file", "line", "row")   # where a record came from; see babelforge.data.validate

BUNDLED_LANGUAGES: dict[str, tuple[str, ...]] = {
    "ntrex": tuple(NTREX_FILES),
    "tatoeba": tuple(TATOEBA_CODES),   # each pairs with English
}


def _language_code(value: str, key: str) -> str:
    code = to_iso639_1(value)
    if code is None:
        raise ValueError(f"{key} {value!r} is not an ISO 639-1 code (or an ISO 639-3 code babelforge can map)")
    return code


class SourceConfig(StrictModel):
    """One input: a bundled corpus or a path (file, directory or glob; local or URI)."""

    path: str | None = None
    bundled: Literal["ntrex", "tatoeba"] | None = None
    languages: list[str] | None = None          # bundled only: a subset of the corpus' languages
    name: str | None = None                     # the `source` column; defaults to `bundled` or `path`
    format: SourceFormat = "auto"
    text_field: str = "text"                    # jsonl / parquet
    id_field: str | None = None                 # jsonl / parquet; else id = hash(source name, file, line/row)
    lang: str | None = None                     # the language of every record of this source
    lang_field: str | None = None               # jsonl / parquet: per-record language
    meta_fields: list[str] = Field(default_factory=list)   # jsonl / parquet fields copied into `meta`

    @field_validator("lang")
    @classmethod
    def _lang_is_a_code(cls, value: str | None) -> str | None:
        return None if value is None else _language_code(value, "lang")

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> "SourceConfig":
        if (self.path is None) == (self.bundled is None):
            raise ValueError("set exactly one of `path` (file, directory, glob or URI) and `bundled` (ntrex|tatoeba)")
        if self.lang is not None and self.lang_field is not None:
            raise ValueError("set at most one of `lang` (fixed) and `lang_field` (per record)")
        reserved = sorted(set(self.meta_fields) & set(RESERVED_META_KEYS))
        if reserved:
            raise ValueError(f"`meta_fields`: {reserved} are reserved meta keys (the record's location)")
        if self.bundled is None:
            if self.languages is not None:
                raise ValueError("`languages` applies to bundled sources only; use `lang` or `lang_field`")
            return self
        if self.lang is not None or self.lang_field is not None:
            raise ValueError(f"`lang`/`lang_field`: bundled {self.bundled} files carry their language in their name")
        if self.format not in ("auto", "text"):
            raise ValueError(f"`format`: bundled {self.bundled} is plain text, got {self.format!r}")
        available = BUNDLED_LANGUAGES[self.bundled]
        unknown = [lang for lang in self.languages or () if lang not in available]
        if unknown:
            raise ValueError(f"`languages`: {self.bundled} has no {unknown}; available: {', '.join(available)}")
        return self

    @property
    def display_name(self) -> str:
        """The value of the ``source`` column for this source's rows."""
        return self.name or self.bundled or str(self.path)


class DedupConfig(StrictModel):
    """Global duplicate removal: exact (same normalised text) and near (MinHash LSH on character n-grams)."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.85, gt=0.0, lt=1.0)   # Jaccard similarity of character n-gram sets
    num_perm: int = Field(128, ge=8, le=1024)        # MinHash permutations
    ngram: int = Field(5, ge=1, le=64)               # characters per shingle
    per_language: bool = True   # compare texts of the same language only (parallel corpora repeat names, numbers)


class LangIdConfig(StrictModel):
    """Offline language identification (py3langid) for records without a declared language."""

    enabled: bool = True
    allowed_langs: list[str] | None = None   # ISO 639-1 codes; other languages are quarantined
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    verify: bool = False                     # also check declared languages; mismatches are quarantined

    @field_validator("allowed_langs")
    @classmethod
    def _codes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_language_code(v, "allowed_langs entry") for v in value]


class DecontaminateConfig(StrictModel):
    """Evaluation texts that must not reach the corpus (exact match of the canonical text; nothing by default).

    ``holdout_fraction``/``seed`` left null mean the evaluation split's defaults
    (``babelforge.eval.bitext.DEFAULT_HOLDOUT_FRACTION``/``DEFAULT_SPLIT_SEED``), resolved when the
    texts are collected: importing ``babelforge.eval`` here would load the model stack into every
    worker that unpickles an ingest config.
    """

    ntrex_heldout: bool = False                  # the held-out lines of every NTREX language file
    holdout_fraction: float | None = Field(None, ge=0.0, le=1.0)   # must match eval's ntrex_split
    seed: int | None = None                                        # must match eval's ntrex_split
    text_files: list[str] = Field(default_factory=list)   # evaluation texts, one per line (local or URI)

    @property
    def enabled(self) -> bool:
        return self.ntrex_heldout or bool(self.text_files)


class RayOptions(StrictModel):
    """How the job starts or joins Ray (see :func:`babelforge.utils.ray_env.init_ray`)."""

    address: str | None = None    # "auto" joins a running cluster; unset starts a local one
    num_cpus: int | None = Field(None, ge=1)


class IngestConfig(StrictModel):
    """Everything the ingest stage needs; see ``jobs/configs/ingest.yaml`` for a commented example."""

    sources: list[SourceConfig] = Field(min_length=1)
    output_dir: str
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2000, ge=1)
    overlong: Literal["drop", "split", "truncate"] = "split"
    normalize: Literal["NFC", "NFKC"] = "NFC"
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    rows_per_shard: int = Field(100_000, ge=1)   # input lines/rows per shard (one file = one or more shards)
    batch_rows: int = Field(2048, ge=1)          # rows per batch inside a shard
    keep_staging: bool = False                   # keep the pre-dedup shards under _ingest/ after success
    ray: RayOptions = Field(default_factory=RayOptions)

    @model_validator(mode="after")
    def _length_bounds(self) -> "IngestConfig":
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the output (a resumed run must use the same ones).

        ``decontaminate`` counts only when enabled: then its settings change the output (plans made
        before it existed stay resumable). The contents of the evaluation texts are added by ingest.
        """
        exclude = {"output_dir", "batch_rows", "keep_staging", "ray"}
        if not self.decontaminate.enabled:
            exclude.add("decontaminate")
        return self.model_dump(mode="json", exclude=exclude)
