"""Parsing messy LLM output into examples, and validating them (no Ray, no model)."""

from __future__ import annotations

import pytest

from babelforge.synth.parse import Rejection, check_generation, extract_record, parse_texts

EN_QUERY = "How do small towns pay for their public buses?"
EN_POS = "Small towns usually fund public buses through local taxes, ticket sales and grants from the region."
EN_NEG = "Public buses in large cities often run every few minutes during the morning rush hour."
DE_POS = "Kleine Städte finanzieren ihre Busse meist über lokale Steuern, Fahrkarten und Zuschüsse der Region."
DE_NEG = "In großen Städten fahren die Busse während des Berufsverkehrs oft alle paar Minuten."


def _json(query=EN_QUERY, positive=EN_POS, negative=EN_NEG) -> str:
    import json

    return json.dumps({"query": query, "positive": positive, "hard_negative": negative}, ensure_ascii=False)


@pytest.mark.parametrize("text", [
    _json(),
    f"```json\n{_json()}\n```",
    f"Sure! Here is the example:\n```\n{_json()}\n```\nLet me know if you need more.",
    f"Here you go: {_json()} I hope this helps {{with your task}}.",
    _json()[:-1] + ",}",                                             # trailing comma
    str({"query": EN_QUERY, "positive": EN_POS, "hard_negative": EN_NEG}),  # Python dict, single quotes
    '{"example": ' + _json() + "}",                                  # nested object
    "[" + _json() + "]",                                             # a list of objects
    '{"note": "draft"} ' + _json() + " " + _json(query="second"),    # several objects: first with the fields
    _json().replace('"hard_negative"', '"Hard Negative"').replace('"query"', '"Query"'),  # key spelling
    _json().replace('"hard_negative"', '"hardNegative"'),
    "```json\n" + _json(),                                           # unterminated fence
    _json().replace("Small towns", "Small\ntowns"),                  # raw newline inside a string
])
def test_messy_output_parses_to_the_same_texts(text):
    texts = parse_texts(text)
    assert (texts.query, texts.positive, texts.hard_negative) == (EN_QUERY, EN_POS, EN_NEG)


def test_first_object_with_the_fields_wins_and_braces_inside_strings_are_text():
    record = extract_record('{"query": "a {b}", "positive": "c ]"} {"query": "x", "positive": "y"}')
    assert record == {"query": "a {b}", "positive": "c ]"}


@pytest.mark.parametrize("text, reason, detail", [
    (_json()[:60], "invalid_json", "no complete JSON object"),              # truncated mid-object
    ('{"query": "q", "positive": "p", "hard_negative": "n"', "invalid_json", "truncated"),
    ("I cannot help with that.", "invalid_json", "no JSON object"),
    ('{"query": "q", "text": "t"}', "missing_field", "'positive'"),
    ('{"query": "q", "positive": "p"}', "missing_field", "'hard_negative' is missing"),
    ('{"query": "q", "positive": ["p1", "p2"], "hard_negative": "n"}', "missing_field", "is a list"),
    ('{"query": "  ", "positive": "p", "hard_negative": "n"}', "empty_field", "'query' is empty"),
    ('{"query": "q", "positive": "...", "hard_negative": "n"}', "empty_field", "'positive' is empty"),
])
def test_unusable_output_is_rejected_with_a_reason(text, reason, detail):
    with pytest.raises(Rejection) as caught:
        parse_texts(text)
    assert caught.value.reason == reason and detail in caught.value.detail


def test_hard_negative_may_be_optional():
    assert parse_texts('{"query": "q", "positive": "p"}', require_hard_negative=False).hard_negative is None


def test_valid_generation_passes_all_checks():
    texts = check_generation(f"```json\n{_json()}\n```", "short_long", "en", "en")
    assert texts.query == EN_QUERY


@pytest.mark.parametrize("text, task, query_lang, positive_lang, reason, detail", [
    (_json(positive=DE_POS, negative=DE_NEG), "qa", "en", "en", "wrong_language", "'positive' is in de"),
    (_json(), "qa", "de", "de", "wrong_language", "'query' is in en (detected), expected de"),
    (_json(query=EN_POS.upper()), "qa", "en", "en", "query_equals_positive", "same text"),
    (_json(negative=EN_POS), "qa", "en", "en", "negative_equals_positive", "same text"),
    (_json(negative=EN_QUERY), "qa", "en", "en", "negative_equals_query", "same text"),
    (_json(query=DE_POS, positive="Herr", negative="Moz"), "bitext", "de", "en", "length_mismatch", "ratio limit 4"),
    (_json(query="word " * 60), "short_long", "en", "en", "too_long", "limit 200 for short_long"),
    (_json(positive="Spreads."), "short_long", "en", "en", "too_short", "'positive' has 8 characters (minimum 30"),
    (_json(query="why is there less honey this year"), "short_long", "en", "en", "copied_example", "worked example"),
    (_json(positive=EN_POS, negative=DE_NEG), "bitext", "en", "de", "wrong_language", "'positive' is in en"),
])
def test_invalid_examples_are_rejected(text, task, query_lang, positive_lang, reason, detail):
    with pytest.raises(Rejection) as caught:
        check_generation(text, task, query_lang, positive_lang)
    assert caught.value.reason == reason and detail in caught.value.detail


def test_bitext_checks_each_side_against_its_own_language():
    texts = check_generation(_json(positive=DE_POS, negative=DE_NEG), "bitext", "en", "de")
    assert texts.positive == DE_POS


def test_short_texts_skip_the_language_check():
    text = _json(query="Busse Kosten", positive=EN_POS, negative=EN_NEG)  # 12 characters: not checked
    assert check_generation(text, "short_long", "en", "en").query == "Busse Kosten"
    with pytest.raises(Rejection, match="wrong_language"):
        check_generation(text, "short_long", "en", "en", langid_min_chars=5)
