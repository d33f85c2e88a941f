"""Pair building: bitext never includes evaluation sentences; synthetic rows keep their fields and
get the positive's language for bitext; translation groups join exactly the pairs of one sentence."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.config import load_config_dict
from babelforge.data.pairs import (PAIRS_INPUT_SCHEMA, PairFiles, SyntheticPairs, iter_pair_tables, ntrex_pairs,
                                   synthetic_to_pairs, tatoeba_eval_lines, tatoeba_pairs)
from babelforge.errors import ConfigError
from babelforge.eval.bitext import read_ntrex, split_ntrex_lines, tatoeba_task
from babelforge.filter.config import FilterConfig


def _line(pair_id: str) -> int:
    return int(pair_id.rsplit("-", 1)[1])


def test_ntrex_pairs_use_only_training_lines():
    table = ntrex_pairs(["en-de", "fr-en"])
    split = split_ntrex_lines()
    lines = {_line(i) for i in table.column("id").to_pylist()}
    assert lines == set(split.train_lines)
    assert not lines & set(split.heldout_lines)
    assert table.num_rows == 2 * len(split.train_lines)
    english, german = read_ntrex("en"), read_ntrex("de")
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["query"], row["positive"]) == (english[_line(row["id"])], german[_line(row["id"])])
    assert (row["query_lang"], row["positive_lang"], row["task"], row["source"]) == ("en", "de", "bitext", "ntrex")
    assert row["instruction"] == "Given a sentence in English, retrieve its translation in German"


def test_ntrex_sample_is_stable_and_within_the_training_split():
    first = ntrex_pairs(["en-ru"], max_pairs=50, sample_seed=1).column("id").to_pylist()
    assert first == ntrex_pairs(["en-ru"], max_pairs=50, sample_seed=1).column("id").to_pylist()
    assert len(first) == 50 and {_line(i) for i in first} <= set(split_ntrex_lines().train_lines)


def test_tatoeba_pairs_exclude_the_lines_eval_queries():
    eval_task = tatoeba_task("sw", max_queries=200, seed=0)
    eval_queries = {t for t in eval_task.queries.values()}
    table = tatoeba_pairs(["sw"], direction="both", eval_queries=200, eval_seed=0)
    lines = {_line(i) for i in table.column("id").to_pylist()}
    assert len(lines) == 390 - 200 and not lines & tatoeba_eval_lines(390, 200, 0)   # Swahili has 390 lines
    to_english = table.filter(pa.compute.equal(table.column("query_lang"), "sw"))
    assert not set(to_english.column("query").to_pylist()) & eval_queries
    assert set(table.column("positive_lang").to_pylist()) == {"sw", "en"}
    assert tatoeba_pairs(["sw"], eval_queries=None).num_rows == 0   # everything held out


def test_ntrex_pairs_of_one_line_share_its_group_in_every_language_pair():
    table = ntrex_pairs(["en-de", "fr-en", "ru-zh"], max_pairs=30)
    rows = table.to_pylist()
    assert all(r["group"] == f"ntrex:{_line(r['id'])}" for r in rows)
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    assert len(by_group) == 30 and all(len(members) == 3 for members in by_group.values())
    for members in by_group.values():                    # one sentence: the same line in every language
        line = _line(members[0]["id"])
        texts = {t for r in members for t in (r["query"], r["positive"])}
        assert texts == {read_ntrex(lang)[line] for lang in ("en", "de", "fr", "ru", "zh")}


def test_tatoeba_groups_are_per_language_file_and_line():
    table = tatoeba_pairs(["sw", "de"], direction="both", max_pairs=20)
    rows = table.to_pylist()
    foreign = {r["query_lang"] if r["query_lang"] != "en" else r["positive_lang"] for r in rows}
    assert foreign == {"sw", "de"}
    for r in rows:
        lang = r["query_lang"] if r["query_lang"] != "en" else r["positive_lang"]
        assert r["group"] == f"tatoeba:{lang}:{_line(r['id'])}"
    to_en = {r["group"]: (r["query"], r["positive"]) for r in rows if r["positive_lang"] == "en"}
    from_en = {r["group"]: (r["positive"], r["query"]) for r in rows if r["query_lang"] == "en"}
    assert to_en == from_en                               # both directions of a line: one group, same texts


def test_synthetic_rows_become_pairs_with_languages():
    table = pa.table({
        "id": ["a", "b", "c", "d"], "query": ["q1", "Wie geht es dir heute, mein lieber Freund?", "q3", "q4"],
        "positive": ["p1", "How are you today, my dear friend? I hope all is well.", "p3", "p4"],
        "hard_negative": ["n1", None, None, None], "lang": ["de", "de", "de-en", "sw"],
        "task": ["qa", "bitext", "bitext", "bitext"], "instruction": ["find answers", None, None, None],
        "positive_lang": [None, None, None, "en"]})
    pairs = synthetic_to_pairs(table).to_pylist()
    assert [(p["query_lang"], p["positive_lang"]) for p in pairs] == [("de", "de"), ("de", "en"), ("de", "en"),
                                                                      ("sw", "en")]
    assert pairs[0]["hard_negative"] == "n1" and pairs[0]["instruction"] == "find answers"
    assert {p["source"] for p in pairs} == {"synthetic"}
    assert {p["group"] for p in pairs} == {None}          # a shared seed passage is not shared content


def test_parquet_sources_stream_and_keep_incomplete_rows(tmp_path):
    (tmp_path / "synth" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x", "y"], "query": ["q", None], "positive": ["p", "p2"], "lang": ["en", "en"],
                             "task": ["qa", "qa"]}), tmp_path / "synth" / "data" / "part-0.parquet")
    (tmp_path / "synth" / "quarantine").mkdir()
    pq.write_table(pa.table({"id": ["bad"]}), tmp_path / "synth" / "quarantine" / "part-0.parquet")
    tables = list(iter_pair_tables(SyntheticPairs(synthetic=str(tmp_path / "synth"))))
    assert [t.schema for t in tables] == [PAIRS_INPUT_SCHEMA]
    assert tables[0].column("query").to_pylist() == ["q", None]   # the filter stage quarantines it
    pq.write_table(pa.table({"id": ["z"], "query": ["q"], "positive": ["p"]}), tmp_path / "pairs.parquet")
    (pairs,) = iter_pair_tables(PairFiles(pairs=str(tmp_path / "pairs.parquet")))
    assert pairs.to_pylist()[0]["task"] is None and pairs.to_pylist()[0]["group"] is None and pairs.num_rows == 1
    pq.write_table(pa.table({"id": ["g"], "query": ["q"], "positive": ["p"], "group": ["line-7"]}),
                   tmp_path / "grouped.parquet")
    (grouped,) = iter_pair_tables(PairFiles(pairs=str(tmp_path / "grouped.parquet")))
    assert grouped.column("group").to_pylist() == ["line-7"]


def test_source_config_validates_language_pairs():
    with pytest.raises(ConfigError, match="en-en"):
        load_config_dict({"output_dir": "o", "teacher": {"model": "m"}, "inputs": [{"ntrex": {"pairs": ["en-en"]}}]},
                         FilterConfig)
    with pytest.raises(ConfigError, match="Tatoeba has no"):
        load_config_dict({"output_dir": "o", "teacher": {"model": "m"}, "inputs": [{"tatoeba": {"langs": ["xx"]}}]},
                         FilterConfig)
