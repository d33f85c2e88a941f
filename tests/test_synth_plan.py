"""Persona library, seed sampling and quota planning."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.errors import DataFormatError
from babelforge.schema import CORPUS_SCHEMA, TASK_TYPES
from babelforge.synth.personas import Persona, load_personas
from babelforge.synth.plan import (SeedPassage, SeedPool, _candidates, _threshold, build_plan, plan_fingerprint,
                                   sample_seed_passages, shard_plan)
from babelforge.synth.prompts import build_messages

PERSONAS = [Persona(f"p{i}", f"Persona number {i}.") for i in range(7)]


def _pool(langs=("en", "de"), per_lang=30) -> SeedPool:
    by_language = {lang: [SeedPassage(f"{lang}-{i}", f"{lang} passage {i}", lang) for i in range(per_lang)]
                   for lang in langs}
    return SeedPool(by_language, [p for passages in by_language.values() for p in passages])


def test_starter_library_is_broad_and_well_formed():
    personas = load_personas()
    assert len(personas) >= 100 and len({p.id for p in personas}) == len(personas)
    assert len({p.domain for p in personas}) >= 20
    assert all(p.persona.endswith(".") for p in personas)


def test_persona_file_errors_name_the_line(tmp_path):
    path = tmp_path / "personas.jsonl"
    path.write_text('{"persona": "A chef."}\n\n{"id": "x", "persona": ""}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"personas.jsonl:3: field 'persona'"):
        load_personas(path)
    path.write_text('{"persona": "A chef."}\n{"id": "personas-1", "persona": "A cook."}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match="duplicate id 'personas-1'"):
        load_personas(path)
    path.write_text('{"persona": "A chef.", "source": "ignored"}\n', encoding="utf-8")
    assert load_personas(path) == [Persona("personas-1", "A chef.")]


def test_plan_meets_quotas_with_every_task_in_every_language():
    plan = build_plan(_pool(), PERSONAS, ["en", "de"], {"en": 12, "de": 7}, list(TASK_TYPES), seed=3)
    assert Counter(item.lang for item in plan) == {"en": 12, "de": 7}
    for lang in ("en", "de"):
        per_task = Counter(item.task for item in plan if item.lang == lang)
        assert set(per_task) == set(TASK_TYPES) and max(per_task.values()) - min(per_task.values()) <= 1
    assert len({item.id for item in plan}) == len(plan)
    assert all(item.seed_lang == item.lang for item in plan)  # same-language seeds first
    assert {item.lang for item in plan[:6]} == {"en", "de"}     # shuffled: shards mix languages


def test_plan_is_deterministic_by_seed():
    args = (_pool(), PERSONAS, ["en", "de"], {"en": 10, "de": 10}, list(TASK_TYPES))
    assert build_plan(*args, seed=1) == build_plan(*args, seed=1)
    assert build_plan(*args, seed=1) != build_plan(*args, seed=2)
    assert plan_fingerprint(build_plan(*args, seed=1), 4) == plan_fingerprint(build_plan(*args, seed=1), 4)
    assert plan_fingerprint(build_plan(*args, seed=1), 4) != plan_fingerprint(build_plan(*args, seed=1), 5)


def test_bitext_pairs_languages_with_the_pivot():
    plan = build_plan(_pool(("en", "de", "fr")), PERSONAS, ["en", "de", "fr"], {"en": 5, "de": 5, "fr": 5},
                      ["bitext"], seed=0)
    pairs = {(item.lang, item.positive_lang) for item in plan}
    assert pairs == {("de", "en"), ("fr", "en"), ("en", "de")}
    item = next(i for i in plan if i.lang == "fr")
    assert item.instruction in ("Given a sentence in French, retrieve its translation in English",
                                "Retrieve parallel sentences", "Given a text, retrieve its translation")
    prompt = build_messages(item)[-1]["content"]
    assert "Write the query in French and the positive and hard_negative in English." in prompt
    only_pivot = build_plan(_pool(("en",)), PERSONAS, ["en"], {"en": 4}, ["bitext", "qa"], seed=0)
    assert {item.task for item in only_pivot} == {"qa"}


def test_languages_without_seeds_borrow_other_languages_passages():
    plan = build_plan(_pool(("en",), per_lang=3), PERSONAS, ["sw"], {"sw": 5}, ["qa"], seed=0)
    assert [item.seed_lang for item in plan] == ["en"] * 5 and len({item.seed_id for item in plan}) == 3
    prompt = build_messages(plan[0], one_shot=True)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert "Write all three texts in Swahili." in prompt[-1]["content"] and "en passage" in prompt[-1]["content"]


def test_shards_are_consecutive_chunks():
    plan = build_plan(_pool(), PERSONAS, ["en"], {"en": 10}, ["qa"], seed=0)
    shards = shard_plan(plan, 4)
    assert [s.name for s in shards] == ["part-00000", "part-00001", "part-00002"]
    assert [len(s.items) for s in shards] == [4, 4, 2] and [i for s in shards for i in s.items] == plan


def _write_corpus(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "lang": [r[2] for r in rows],
                      "source": ["test"] * len(rows), "meta": [json.dumps({})] * len(rows)}, schema=CORPUS_SCHEMA)
    pq.write_table(table, path)


def test_seed_sampling_is_uniform_per_language_and_independent_of_file_layout(tmp_path, ray_local):
    rows = [(f"{lang}-{i}", f"{lang} passage number {i} " + "x" * (i % 7) * 20, lang)
            for lang in ("en", "de") for i in range(40)] + [("tiny", "short", "en"), ("nolang", "y" * 60, None)]
    _write_corpus(tmp_path / "one" / "data" / "part-0.parquet", rows)
    _write_corpus(tmp_path / "two" / "data" / "part-0.parquet", rows[::2])
    _write_corpus(tmp_path / "two" / "data" / "part-1.parquet", rows[1::2])
    quotas = {"en": 5, "de": 3, "sw": 2}
    one = sample_seed_passages(str(tmp_path / "one"), quotas, seed=7, min_chars=20, max_chars=40)
    two = sample_seed_passages(str(tmp_path / "two"), quotas, seed=7, min_chars=20, max_chars=40)
    assert one == two
    assert [len(one.by_language[lang]) for lang in ("en", "de", "sw")] == [5, 3, 0]
    assert all(p.lang == "en" for p in one.by_language["en"]) and len(one.any_language) == 5
    assert all(len(p.text) <= 40 and p.id != "tiny" for p in one.any_language)
    other_seed = sample_seed_passages(str(tmp_path / "one"), quotas, seed=8, min_chars=20, max_chars=40)
    assert other_seed.by_language["en"] != one.by_language["en"]


def test_only_about_one_and_a_half_quotas_of_candidates_leave_a_block():
    batch = pa.table({"id": [f"doc-{i}" for i in range(20000)], "text": ["a passage long enough"] * 20000,
                      "lang": ["en", "de"] * 10000})
    thresholds = {"en": _threshold(50, 10000), "de": _threshold(5, 10000)}
    out = _candidates(batch, seed=0, thresholds=thresholds, any_threshold=_threshold(50, 20000), min_chars=5,
                      max_chars=100)
    per_lang = Counter(out["lang"].to_pylist())
    assert 50 < per_lang["en"] < 400 and 5 < per_lang["de"] < 200 and per_lang["en"] + per_lang["de"] < 600


def test_seed_sampling_names_a_missing_corpus_or_column(tmp_path, ray_local):
    with pytest.raises(DataFormatError, match="no parquet files"):
        sample_seed_passages(str(tmp_path / "missing"), {"en": 1}, seed=0, min_chars=1, max_chars=10)
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataFormatError, match="missing required column"):
        sample_seed_passages(str(tmp_path / "bad.parquet"), {"en": 1}, seed=0, min_chars=1, max_chars=10)
