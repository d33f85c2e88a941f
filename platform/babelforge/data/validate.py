"""Turning raw records into corpus rows, or into quarantine rows with a reason (pure compute, no Ray).

:func:`process_shard` reads one shard (:mod:`babelforge.data.readers`) and, record by record, takes
the id, text, language and meta fields the source config names, normalises the text, checks it, drops
evaluation texts (``decontaminate``: the whole text, then each chunk of a split or truncated text, is
looked up in an :class:`~babelforge.data.decontaminate.EvalTextIndex`), fills the language (py3langid)
where the source gives none and applies the overlong rule. Each output row is
either kept or carries ``_reject_reason``/``_reject_detail`` (see :data:`REASONS`), the raw record and
its location ``file:line``, for :class:`~babelforge.data.shards.ShardWriter` to route.

Ids are the ``id_field`` value when configured, else a stable hash of ``<source name>/<file>:<line>``
(16 hex characters); chunks of a split text get ``<id>#<k>`` (k from 0). ``meta`` is a JSON object
with the requested ``meta_fields`` plus the record's ``file`` and ``line`` (or parquet ``row``).

    >>> cfg = IngestConfig(output_dir="/tmp/x", sources=[{"path": "in.jsonl"}], min_chars=3)
    >>> record = RawRecord("in.jsonl:7", {"line": 7}, '{"text": "Hi"}', {"text": "Hi"})
    >>> row = process_records([record], RecordContext.create(cfg, 0, "in.jsonl", None))[0]
    >>> row["_reject_reason"], row["_reject_detail"]
    ('too_short', "field 'text' has 2 characters, fewer than min_chars=3")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from babelforge.data.config import IngestConfig, SourceConfig
from babelforge.data.decontaminate import EvalTextIndex
from babelforge.data.langid import detect_language, is_undetermined, to_iso639_1
from babelforge.data.normalize import normalize_text, split_text, truncate_text
from babelforge.data.readers import RawRecord, ShardSpec, json_default, read_shard
from babelforge.data.shards import REJECT_DETAIL, REJECT_REASON, REJECT_RECORD, REJECT_SOURCE

__all__ = ["REASONS", "OUTPUT_SCHEMA", "RecordContext", "process_records", "process_shard", "stable_id"]

# Reason codes of the ingest quarantine (the `reason` column); the `detail` column names the field.
REASONS: dict[str, str] = {
    "invalid_utf8": "the line (or a binary text value) is not valid UTF-8",
    "invalid_json": "a jsonl line is blank or not valid JSON",
    "not_an_object": "a jsonl line is valid JSON but not an object",
    "invalid_id": "the configured id field is missing, null, empty or not a string/integer",
    "missing_text": "the text field is missing or null",
    "non_string_text": "the text field is not a string",
    "empty_text": "the text is empty or whitespace after normalisation",
    "too_short": "the text (or a chunk of a split text) has fewer than min_chars characters",
    "too_long": "the text has more than max_chars characters and overlong is 'drop'",
    "invalid_language": "the declared language is not a string or not a recognisable language code",
    "undetected_language": "no language was declared and detection found none or was below langid.min_confidence",
    "language_mismatch": "langid.verify is on and the detected language differs from the declared one",
    "disallowed_language": "the language is not in langid.allowed_langs",
    "eval_contamination": "the text (or a chunk of a split or truncated text) equals an evaluation text up to "
                          "normalisation, case and whitespace (decontaminate); the detail names the evaluation text",
    "duplicate_id": "another record kept earlier has the same id",
    "exact_duplicate": "a record kept earlier has the same normalised text",
    "near_duplicate": "a record kept earlier has a near-identical text (MinHash LSH over character n-grams)",
}

OUTPUT_SCHEMA = pa.schema([
    ("_shard", pa.string()), ("id", pa.string()), ("text", pa.string()), ("lang", pa.string()),
    ("source", pa.string()), ("meta", pa.string()), ("origin", pa.string()),
    ("_chunk", pa.int32()),            # k of a split text's chunk (0 for unsplit texts)
    ("_lang_detected", pa.bool_()), ("_truncated", pa.bool_()),
    (REJECT_REASON, pa.string()), (REJECT_DETAIL, pa.string()), (REJECT_RECORD, pa.string()),
    (REJECT_SOURCE, pa.string()),
])


def stable_id(key: str) -> str:
    """16 hex characters identifying ``key`` (``<source name>/<file>:<line>``), the same on every machine."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RecordContext:
    """What record processing needs to know about the run, the source and the file."""

    cfg: IngestConfig
    source: SourceConfig
    file_display: str
    file_lang: str | None
    eval_texts: EvalTextIndex | None = None   # decontamination off when None

    @classmethod
    def create(cls, cfg: IngestConfig, source_index: int, file_display: str, file_lang: str | None,
               eval_texts: EvalTextIndex | None = None) -> "RecordContext":
        return cls(cfg, cfg.sources[source_index], file_display, file_lang, eval_texts)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "an integer"}.get(
        type(value), f"a {type(value).__name__}")


def _record_id(record: RawRecord, ctx: RecordContext) -> str:
    field = ctx.source.id_field
    if field is None:
        line = record.position.get("line", record.position.get("row"))
        return stable_id(f"{ctx.source.display_name}/{ctx.file_display}:{line}")
    assert record.fields is not None
    value = record.fields.get(field)
    if value is None or value == "":
        state = "missing" if field not in record.fields else "null" if value is None else "empty"
        raise _Rejected("invalid_id", f"field {field!r} is {state}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Rejected("invalid_id", f"field {field!r} is {_type_name(value)}, expected a string or an integer")
    return str(value)


def _record_text(record: RawRecord, ctx: RecordContext) -> str:
    field = ctx.source.text_field
    assert record.fields is not None
    if record.fields.get(field) is None:
        raise _Rejected("missing_text", f"field {field!r} is {'null' if field in record.fields else 'missing'}")
    value = record.fields[field]
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Rejected("invalid_utf8",
                            f"field {field!r} is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    if not isinstance(value, str):
        raise _Rejected("non_string_text", f"field {field!r} is {_type_name(value)}, expected a string")
    text = normalize_text(value, ctx.cfg.normalize)
    if not text:
        raise _Rejected("empty_text", f"field {field!r} is empty after normalisation (was {len(value)} characters)")
    if len(text) < ctx.cfg.min_chars:
        raise _Rejected("too_short", f"field {field!r} has {len(text)} characters, fewer than "
                                     f"min_chars={ctx.cfg.min_chars}")
    if len(text) > ctx.cfg.max_chars and ctx.cfg.overlong == "drop":
        raise _Rejected("too_long", f"field {field!r} has {len(text)} characters, more than "
                                    f"max_chars={ctx.cfg.max_chars} (overlong: drop)")
    return text


def _check_not_eval_text(text: str, ctx: RecordContext, what: str) -> None:
    """Reject ``text`` (described by ``what``) when its canonical form is an evaluation text."""
    source = ctx.eval_texts.match(text) if ctx.eval_texts is not None else None
    if source is not None:
        raise _Rejected("eval_contamination", f"{what} matches {source}")


def _check_chunk(chunk: str, k: int, ctx: RecordContext) -> None:
    what = f"field {ctx.source.text_field!r}: chunk {k} of the split text"
    if len(chunk) < ctx.cfg.min_chars:
        raise _Rejected("too_short", f"{what} has {len(chunk)} characters, fewer than min_chars={ctx.cfg.min_chars}")
    _check_not_eval_text(chunk, ctx, what)


def _declared_language(record: RawRecord, ctx: RecordContext) -> str | None:
    if ctx.file_lang is not None:
        return ctx.file_lang
    field = ctx.source.lang_field
    value = record.fields.get(field) if field and record.fields else None
    if value is None or (isinstance(value, str) and (not value.strip() or is_undetermined(value))):
        return None
    code = to_iso639_1(value) if isinstance(value, str) else None
    if code is None:
        raise _Rejected("invalid_language", f"field {field!r} is {value!r}, not an ISO 639-1/639-3 language code")
    return code


def _language(text: str, declared: str | None, ctx: RecordContext) -> tuple[str | None, bool]:
    """(language, whether it was detected) after the langid rules."""
    langid = ctx.cfg.langid
    field = ctx.source.lang_field or "lang"
    lang, detected = declared, False
    if langid.enabled and (declared is None or langid.verify):
        found, confidence = detect_language(text)
        confident = found is not None and confidence >= langid.min_confidence
        if declared is None:
            if not confident:
                what = f"detected {found!r} with confidence {confidence:.2f}" if found else "found no language"
                raise _Rejected("undetected_language", f"field {field!r} is missing and detection {what} "
                                                       f"(langid.min_confidence={langid.min_confidence})")
            lang, detected = found, True
        elif confident and found != declared:
            raise _Rejected("language_mismatch", f"field {field!r} declares {declared!r} but the text is detected as "
                                                 f"{found!r} (confidence {confidence:.2f})")
    if langid.allowed_langs is not None and lang not in langid.allowed_langs:
        raise _Rejected("disallowed_language", f"field {field!r} is {lang!r}, not in langid.allowed_langs "
                                               f"{langid.allowed_langs}")
    return lang, detected


def _meta(record: RawRecord, ctx: RecordContext) -> str:
    fields = record.fields or {}
    meta = {name: fields[name] for name in ctx.source.meta_fields if name in fields}
    meta.update(file=ctx.file_display, **record.position)
    return json.dumps(meta, ensure_ascii=False, default=json_default)


def _rejected_row(reason: str, detail: str, raw: str, location: str, record_id: str | None = None) -> dict[str, Any]:
    return {"id": record_id, REJECT_REASON: reason, REJECT_DETAIL: detail, REJECT_RECORD: raw,
            REJECT_SOURCE: location, "_chunk": 0}


def _rows(record: RawRecord, ctx: RecordContext) -> list[dict[str, Any]]:
    if record.error is not None:
        return [_rejected_row(*record.error, record.raw, record.location)]
    record_id = None
    try:
        record_id = _record_id(record, ctx)
        text = _record_text(record, ctx)
        _check_not_eval_text(text, ctx, f"field {ctx.source.text_field!r}")
        lang, detected = _language(text, _declared_language(record, ctx), ctx)
    except _Rejected as rejected:
        return [_rejected_row(rejected.reason, rejected.detail, record.raw, record.location, record_id)]

    base = {"id": record_id, "lang": lang, "source": ctx.source.display_name, "meta": _meta(record, ctx),
            "origin": record.location, "_lang_detected": detected, "_truncated": False, "_chunk": 0}
    if len(text) <= ctx.cfg.max_chars:
        return [{**base, "text": text}]
    if ctx.cfg.overlong == "truncate":
        truncated = truncate_text(text, ctx.cfg.max_chars)
        try:
            _check_not_eval_text(truncated, ctx, f"field {ctx.source.text_field!r} truncated to "
                                                 f"max_chars={ctx.cfg.max_chars}")
        except _Rejected as rejected:
            return [_rejected_row(rejected.reason, rejected.detail, record.raw, record.location, record_id)
                    | {"_lang_detected": detected}]
        return [{**base, "text": truncated, "_truncated": True}]
    rows = []
    for k, chunk in enumerate(split_text(text, ctx.cfg.max_chars)):
        row = {**base, "id": f"{record_id}#{k}", "text": chunk, "_chunk": k}
        try:
            _check_chunk(chunk, k, ctx)
        except _Rejected as rejected:
            raw = json.dumps({"id": row["id"], "text": chunk}, ensure_ascii=False)
            row = _rejected_row(rejected.reason, rejected.detail, raw, record.location, row["id"]) | {
                "_chunk": k, "_lang_detected": detected}
        rows.append(row)
    return rows


def process_records(records: list[RawRecord], ctx: RecordContext) -> list[dict[str, Any]]:
    """Output rows (kept or rejected) of ``records``, in order; one or more per record."""
    return [row for record in records for row in _rows(record, ctx)]


def process_shard(spec: ShardSpec, cfg: IngestConfig, eval_texts: EvalTextIndex | None = None) -> Iterator[pa.Table]:
    """Tables of :data:`OUTPUT_SCHEMA` for one shard, ``cfg.batch_rows`` records at a time.

    ``eval_texts``: the evaluation texts to quarantine (:func:`babelforge.data.decontaminate.build_eval_index`).
    """
    ctx = RecordContext.create(cfg, spec.file.source_index, spec.file.display, spec.file.lang, eval_texts)
    for records in read_shard(spec, ctx.source.text_field, cfg.batch_rows):
        rows = process_records(records, ctx)
        for row in rows:
            row["_shard"] = spec.name
        yield pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
