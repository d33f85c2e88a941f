"""Turning raw LLM output into a validated (query, positive, hard negative) triple.

LLMs wrap JSON in code fences, add text before and after, use single quotes or trailing commas,
nest the object, emit several objects or stop mid-object. :func:`extract_record` finds the first
complete JSON object (or Python-literal dict) that carries the example's fields, looking inside
fences and nested objects and lists; truncated JSON is rejected, never repaired.
:func:`check_generation` then validates the texts and raises :class:`Rejection` with a reason
code (the quarantine's ``reason``):

- ``invalid_json``: no complete JSON object in the output;
- ``missing_field`` / ``empty_field``: a required field is absent, not a string, or blank
  (``"..."`` placeholders count as blank);
- ``too_short`` / ``too_long``: a field is outside the task's character limits;
- ``length_mismatch``: a translation (bitext) is far shorter or longer than its source;
- ``query_equals_positive`` / ``negative_equals_positive`` / ``negative_equals_query``: texts
  that must differ do not (compared case- and whitespace-insensitively);
- ``copied_example``: the output repeats the prompt's worked example;
- ``wrong_language``: a field's detected language is not the one asked for.

Language rule: a field is checked (:func:`babelforge.data.langid.detect_language`, py3langid)
only when it has at least ``langid_min_chars`` characters (shorter texts are too ambiguous and
are not checked); text without a detectable language fails; detections in the same confusable
group (``id``/``ms``; ``no``/``nb``/``nn``/``da``; ``hr``/``sr``/``bs``) count as
a match. For bitext the query is checked against the query language and the positive and hard
negative against the partner language.

    >>> extract_record('Sure! ```json\\n{"query": "q", "positive": "p",}\\n``` Hope it helps.')
    {'query': 'q', 'positive': 'p'}
    >>> check_generation('{"query": "Same words.", "positive": "same words"}', "short_short", "en", "en",
    ...                  require_hard_negative=False)
    Traceback (most recent call last):
    ...
    babelforge.synth.parse.Rejection: query_equals_positive: query and positive are the same text
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

from babelforge.data.langid import detect_language
from babelforge.synth.tasks import FIELDS, get_task

__all__ = ["Rejection", "SyntheticTexts", "extract_record", "parse_texts", "check_generation", "languages_match"]

_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[\s\-]+")
_KEY_ALIASES = {
    "question": "query", "search_query": "query",
    "positive_passage": "positive", "positive_document": "positive",
    "negative": "hard_negative", "hardnegative": "hard_negative", "negative_passage": "hard_negative",
    "hard_negative_passage": "hard_negative",
}
_PLACEHOLDERS = {"", "...", "\u2026"}
_CONFUSABLE_GROUPS = ({"id", "ms"}, {"no", "nb", "nn", "da"}, {"hr", "sr", "bs"})


class Rejection(Exception):
    """A generation that cannot become a training example; ``reason`` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SyntheticTexts:
    """The three texts of one accepted example."""

    query: str
    positive: str
    hard_negative: str | None


def _balanced_spans(text: str) -> Iterator[str]:
    """Top-level ``{...}`` / ``[...]`` spans, skipping brackets inside double-quoted strings."""
    depth, start, in_string, escaped = 0, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = depth > 0
        elif ch in "{[":
            if depth == 0:
                start = i
            depth += 1
        elif ch in "}]" and depth:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]


def _decode(span: str) -> Any:
    """JSON, then JSON without trailing commas, then a Python literal (single quotes)."""
    for candidate in (span, _TRAILING_COMMA.sub(r"\1", span)):
        try:
            return json.loads(candidate, strict=False)
        except json.JSONDecodeError:
            pass
    try:
        return ast.literal_eval(span)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _normalize_key(key: Any) -> str:
    name = _SEPARATORS.sub("_", _CAMEL.sub("_", str(key)).strip().lower())
    return _KEY_ALIASES.get(name, name)


def _records(value: Any) -> Iterator[dict[str, Any]]:
    """Dicts that carry at least one example field, outermost first, keys normalised."""
    if isinstance(value, dict):
        normalized: dict[str, Any] = {}
        for key, item in value.items():
            normalized.setdefault(_normalize_key(key), item)
        if any(f in normalized for f in FIELDS):
            yield normalized
        for item in value.values():
            yield from _records(item)
    elif isinstance(value, list):
        for item in value:
            yield from _records(item)


def extract_record(text: str, required: tuple[str, ...] = ("query", "positive")) -> dict[str, Any]:
    """The first JSON object in ``text`` carrying all ``required`` fields (keys normalised).

    Raises :class:`Rejection` (``invalid_json`` or ``missing_field``).
    """
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    partial: dict[str, Any] | None = None
    for source in sources:
        for span in _balanced_spans(source):
            for record in _records(_decode(span)):
                if all(f in record for f in required):
                    return {k: v for k, v in record.items() if k in FIELDS}
                partial = partial or record
    if partial is not None:
        missing = [f for f in required if f not in partial]
        raise Rejection("missing_field", f"JSON object has no {', '.join(map(repr, missing))} "
                                         f"(keys: {', '.join(sorted(partial)) or 'none'})")
    if "{" in text:
        raise Rejection("invalid_json", "no complete JSON object (truncated or malformed)")
    raise Rejection("invalid_json", "no JSON object in the output")


def _text_field(record: dict[str, Any], name: str, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise Rejection("missing_field", f"field {name!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejection("missing_field", f"field {name!r} is a {type(value).__name__}, expected a string")
    text = " ".join(str(value).split())
    if text in _PLACEHOLDERS:
        if required:
            raise Rejection("empty_field", f"field {name!r} is empty")
        return None
    return text


def parse_texts(text: str, require_hard_negative: bool = True) -> SyntheticTexts:
    """Extract the three texts (whitespace-normalised) or raise :class:`Rejection`."""
    record = extract_record(text)
    return SyntheticTexts(query=_text_field(record, "query", True) or "",
                          positive=_text_field(record, "positive", True) or "",
                          hard_negative=_text_field(record, "hard_negative", require_hard_negative))


def languages_match(detected: str | None, expected: str) -> bool:
    """Same code, or both in one group py3langid confuses."""
    return detected == expected or any(detected in g and expected in g for g in _CONFUSABLE_GROUPS)


def _same(a: str, b: str) -> bool:
    return a.casefold().strip(" .!?\"'") == b.casefold().strip(" .!?\"'")


def check_generation(text: str, task: str, query_lang: str, positive_lang: str, *,
                     require_hard_negative: bool = True, langid_min_chars: int = 20) -> SyntheticTexts:
    """Parse and validate one generation for ``task``; raise :class:`Rejection` if unusable."""
    spec = get_task(task)
    texts = parse_texts(text, require_hard_negative)
    fields = {"query": texts.query, "positive": texts.positive, "hard_negative": texts.hard_negative}
    for name, value in fields.items():
        if value is None:
            continue
        if len(value) < spec.min_chars.get(name, 0):
            raise Rejection("too_short", f"field {name!r} has {len(value)} characters "
                                         f"(minimum {spec.min_chars[name]} for {task})")
        if len(value) > spec.max_chars.get(name, len(value)):
            raise Rejection("too_long", f"field {name!r} has {len(value)} characters "
                                        f"(limit {spec.max_chars[name]} for {task})")
    if spec.max_length_ratio and not 1 / spec.max_length_ratio <= len(texts.positive) / len(texts.query) \
            <= spec.max_length_ratio:
        raise Rejection("length_mismatch", f"positive has {len(texts.positive)} characters for a query of "
                                           f"{len(texts.query)} (ratio limit {spec.max_length_ratio:g} for {task})")
    if _same(texts.query, texts.positive):
        raise Rejection("query_equals_positive", "query and positive are the same text")
    if texts.hard_negative is not None and _same(texts.hard_negative, texts.positive):
        raise Rejection("negative_equals_positive", "hard_negative and positive are the same text")
    if texts.hard_negative is not None and _same(texts.hard_negative, texts.query):
        raise Rejection("negative_equals_query", "hard_negative and query are the same text")
    if _same(texts.query, spec.example.query) or _same(texts.positive, spec.example.positive):
        raise Rejection("copied_example", "the output repeats the prompt's worked example")
    expected = {"query": query_lang, "positive": positive_lang, "hard_negative": positive_lang}
    for name, value in fields.items():
        if value is None or len(value) < langid_min_chars:
            continue
        detected = detect_language(value)[0]
        if not languages_match(detected, expected[name]):
            raise Rejection("wrong_language", f"field {name!r} is in {detected or 'no language'} (detected), "
                                              f"expected {expected[name]}")
    return texts
