"""Ingest building blocks without Ray: config errors, readers, normalisation, splitting, langid, dedup."""

from __future__ import annotations

import gzip
import json
import re

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHashLSH

from babelforge.config import load_config_dict
from babelforge.data.config import IngestConfig, SourceConfig
from babelforge.data.dedup import (KEY_SCHEMA, DuplicateGroups, MinHasher, duplicate_keys, lsh_bands,
                                   repeated_keys, resolve_duplicates)
from babelforge.data.langid import detect_language, to_iso639_1
from babelforge.data.normalize import normalize_text, split_text, truncate_text
from babelforge.data.readers import plan_shards, read_shard, resolve_source
from babelforge.data.validate import RecordContext, process_records
from babelforge.errors import ConfigError

PARAGRAPH = ("Rivers carry sediment from the mountains to the sea, building deltas over thousands of years. "
             "Farmers have long settled on these fertile plains, where floods renew the soil each spring. "
             "Engineers now build levees and dams that hold the water back but also starve the deltas of mud, "
             "so coastlines retreat while cities grow on land that slowly sinks below the rising tide.")


def _config(**overrides) -> IngestConfig:
    return IngestConfig.model_validate({"output_dir": "/tmp/unused", "sources": [{"path": "in.jsonl"}], **overrides})


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("data, key", [
    ({"sources": [{"path": "a.jsonl", "txt_field": "body"}]}, "sources[0].txt_field: unknown key"),
    ({"sources": [{"path": "a.jsonl", "bundled": "ntrex"}]}, "sources[0]: Value error, set exactly one of `path`"),
    ({"sources": [{"bundled": "ntrex", "languages": ["xx"]}]}, "sources[0]: Value error, `languages`: ntrex has no"),
    ({"sources": [{"path": "a.txt", "lang": "klingon"}]}, "sources[0].lang: Value error, lang 'klingon'"),
    ({"sources": [{"path": "a.jsonl", "meta_fields": ["line"]}]}, "`meta_fields`: ['line'] are reserved"),
    ({"sources": [{"path": "a.jsonl"}], "overlong": "chop"}, "overlong: Input should be 'drop', 'split' or"),
    ({"sources": [{"path": "a.jsonl"}], "min_chars": 10, "max_chars": 5}, "max_chars (5) must be >= min_chars"),
    ({"sources": [{"path": "a.jsonl"}], "dedup": {"threshold": 1.5}}, "dedup.threshold: Input should be less"),
    ({"sources": [{"path": "a.jsonl"}], "langid": {"allowed_langs": ["english"]}}, "langid.allowed_langs"),
    ({"sources": []}, "sources: List should have at least 1 item"),
])
def test_config_errors_name_the_bad_key(data, key):
    with pytest.raises(ConfigError) as err:
        load_config_dict({"output_dir": "/tmp/out", **data}, IngestConfig, source="ingest.yaml")
    assert "ingest.yaml: invalid configuration" in str(err.value) and key in str(err.value)


def test_missing_paths_and_unknown_formats_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[0\].path: '.*nope.jsonl' does not exist"):
        resolve_source(SourceConfig(path=str(tmp_path / "nope.jsonl")), 0)
    (tmp_path / "notes.md").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"sources\[2\].format: cannot infer the format of .*notes.md"):
        resolve_source(SourceConfig(path=str(tmp_path / "notes.md")), 2)
    with pytest.raises(ConfigError, match=r"sources\[1\].path: .*\*.parquet' matches no files"):
        resolve_source(SourceConfig(path=str(tmp_path / "*.parquet")), 1)
    with pytest.raises(ConfigError, match=r"sources\[1\].path: .*missing/\*.jsonl' matches no files"):
        resolve_source(SourceConfig(path=str(tmp_path / "missing" / "*.jsonl")), 1)


# ----------------------------------------------------------------------------------------------- readers

def test_sources_expand_globs_and_directories_and_skip_unknown_files(tmp_path, caplog):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.jsonl", "a/deep/y.jsonl.gz", "a/z.txt", "a/README.md", "a/.hidden.jsonl", "a/_tmp.jsonl"):
        (tmp_path / name).write_bytes(b"")
    by_dir = resolve_source(SourceConfig(path=str(tmp_path / "a")), 0)
    assert [(f.display, f.format) for f in by_dir] == [("deep/y.jsonl.gz", "jsonl"), ("x.jsonl", "jsonl"),
                                                        ("z.txt", "text")]
    assert "README.md" in caplog.text
    by_glob = resolve_source(SourceConfig(path=str(tmp_path / "a" / "**" / "*.jsonl*")), 0)
    assert [f.display for f in by_glob] == ["deep/y.jsonl.gz", "x.jsonl"]
    shallow = resolve_source(SourceConfig(path=str(tmp_path / "a" / "*.jsonl*")), 0)
    assert [f.display for f in shallow] == ["x.jsonl"]
    as_uri = resolve_source(SourceConfig(path=f"file://{tmp_path}/a/*.txt", lang="de"), 3)
    assert [(f.uri, f.lang, f.source_index) for f in as_uri] == [(f"file://{tmp_path}/a/z.txt", "de", 3)]


def test_bundled_sources_carry_languages_from_file_names():
    ntrex = resolve_source(SourceConfig(bundled="ntrex", languages=["zh", "en"]), 0)
    assert [(f.display, f.lang) for f in ntrex] == [("ntrex.zho-CN.txt", "zh"), ("ntrex.eng-US.txt", "en")]
    tatoeba = resolve_source(SourceConfig(bundled="tatoeba", languages=["sw"]), 1)
    assert [(f.display, f.lang) for f in tatoeba] == [("tatoeba.swh-eng.swh", "sw"), ("tatoeba.swh-eng.eng", "en")]


def test_malformed_jsonl_lines_become_records_with_reasons(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    lines = [b'{"text": "ok"}', b'{"text": "caf\xe9"}', b'{"text": ', b"", b"[1, 2]", b'{"text": "last"}']
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    [file] = resolve_source(SourceConfig(path=str(path)), 0)
    specs = plan_shards([file], rows_per_shard=4)
    assert [(s.first_row, s.num_rows) for s in specs] == [(0, 4), (4, 2)]
    records = [r for spec in specs for batch in read_shard(spec, "text", batch_rows=3) for r in batch]
    assert [r.error[0] if r.error else None for r in records] == [
        None, "invalid_utf8", "invalid_json", "invalid_json", "not_an_object", None]
    assert records[1].raw == '{"text": "caf\\xe9"}' and "byte 13" in records[1].error[1]
    assert records[3].error[1] == "line is blank"
    assert [r.location.rsplit(":", 1)[1] for r in records] == ["1", "2", "3", "4", "5", "6"]
    assert records[5].fields == {"text": "last"}


def test_text_lines_are_planned_into_seekable_shards(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\ntwo\n\nfour\nfive")
    [file] = resolve_source(SourceConfig(path=str(path), lang="en"), 0)
    specs = plan_shards([file], rows_per_shard=2)
    assert [(s.first_row, s.num_rows, s.byte_start) for s in specs] == [(0, 2, 0), (2, 2, 9), (4, 1, 15)]
    assert [[r.raw for b in read_shard(s, "text", 10) for r in b] for s in specs] == [
        ["one", "two"], ["", "four"], ["five"]]


def test_fsspec_uris_are_readable(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/part.jsonl", b'{"text": "hello"}\n{"text": "world"}\n')
    [file] = resolve_source(SourceConfig(path="memory://corpus/*.jsonl"), 0)
    [spec] = plan_shards([file], rows_per_shard=10)
    assert [r.fields["text"] for b in read_shard(spec, "text", 10) for r in b] == ["hello", "world"]


# ------------------------------------------------------------------------------ normalisation & length

def test_normalisation_forms_and_cleanup():
    assert normalize_text("Cafe\u0301 \ufb01", "NFC") == "Café \ufb01"
    assert normalize_text("Cafe\u0301 \ufb01", "NFKC") == "Café fi"
    assert normalize_text("\ufeff a\r\nb\rc\x00\x1b\u200d ", "NFC") == "a\nb\nc\u200d"


def test_split_prefers_paragraphs_then_sentences_then_words():
    text = "First paragraph is short.\n\nSecond one has two sentences. The second is here!"
    assert split_text(text, 60) == ["First paragraph is short.", "Second one has two sentences. The second is here!"]
    assert split_text(text, 30) == ["First paragraph is short.", "Second one has two sentences.",
                                    "The second is here!"]
    assert split_text("这是第一句。这是第二句。", 7) == ["这是第一句。", "这是第二句。"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]


@pytest.mark.parametrize("max_chars", [1, 7, 40, 120, 1000])
def test_split_chunks_fit_and_keep_all_text(max_chars):
    text = PARAGRAPH + "\n\n" + PARAGRAPH.upper()
    chunks = split_text(text, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert re.sub(r"\s", "", "".join(chunks)) == re.sub(r"\s", "", text)


def test_truncate_ends_at_a_space_when_one_is_near():
    assert truncate_text("one two three", 9) == "one two"
    assert truncate_text("abcdefghij", 4) == "abcd"
    assert truncate_text("short", 10) == "short"


def test_record_rules_for_overlong_texts():
    record = _record({"id": "r", "text": PARAGRAPH}, line=3)

    def rows(overlong):
        cfg = _config(sources=[{"path": "in.jsonl", "id_field": "id", "lang": "en"}], max_chars=100,
                      overlong=overlong)
        return process_records([record], RecordContext.create(cfg, 0, "in.jsonl", "en"))

    [truncated] = rows("truncate")
    assert truncated["_truncated"] and len(truncated["text"]) <= 100 and PARAGRAPH.startswith(truncated["text"])
    [dropped] = rows("drop")
    assert dropped["_reject_reason"] == "too_long" and "field 'text' has 370 characters" in dropped["_reject_detail"]
    split = rows("split")
    assert [r["id"] for r in split] == ["r#0", "r#1", "r#2", "r#3"]
    assert [r["text"] for r in split[:2]] == re.split(r"(?<=\.) ", PARAGRAPH)[:2]   # whole sentences first
    assert all(len(r["text"]) <= 100 and json.loads(r["meta"]) == {"file": "in.jsonl", "line": 3} for r in split)


def _record(fields, line=1):
    from babelforge.data.readers import RawRecord

    return RawRecord(f"in.jsonl:{line}", {"line": line}, json.dumps(fields), fields)


# ---------------------------------------------------------------------------------------------- langid

def test_language_detection_and_codes():
    assert detect_language("Der schnelle braune Fuchs springt über den faulen Hund.")[0] == "de"
    assert detect_language("今日はとても良い天気ですね。散歩に行きましょう。")[0] == "ja"
    assert detect_language("12 345 678 90")[0] is None   # no linguistic content
    assert [to_iso639_1(c) for c in ("DE", "deu", "de-AT", "cmn_Hans", "arb", "xx1")] == ["de", "de", "de", "zh",
                                                                                        "ar", None]


# ----------------------------------------------------------------------------------------------- dedup

def test_minhash_estimates_jaccard_similarity():
    hasher = MinHasher(num_perm=256, ngram=5)
    variant = PARAGRAPH.replace("thousands", "millions").replace("spring", "autumn")
    a, b = set(hasher.shingles(PARAGRAPH)), set(hasher.shingles(variant))
    exact = len(a & b) / len(a | b)
    estimate = float((hasher.signature(PARAGRAPH) == hasher.signature(variant)).mean())
    assert 0.8 < exact < 0.95 and abs(estimate - exact) < 0.08
    assert MinHasher(256, 5).signature("Case  AND   spacing").tolist() == hasher.signature("case and spacing").tolist()


@pytest.mark.parametrize("threshold, num_perm", [(0.5, 64), (0.85, 128), (0.9, 256)])
def test_lsh_bands_match_datasketch(threshold, num_perm):
    reference = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert lsh_bands(threshold, num_perm) == (reference.b, reference.r)


def _keys(rows, **overrides):
    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "lang": [r[2] for r in rows],
                      "seq": [r[3] for r in rows], "origin": [f"f.jsonl:{r[3]}" for r in rows]})
    options = dict(exact=True, near=True, threshold=0.85, num_perm=128, ngram=5, per_language=True) | overrides
    return duplicate_keys(table, **options)


def test_duplicates_keep_the_first_record_of_each_group():
    near = PARAGRAPH.replace("thousands", "millions")
    keys = _keys([("b", PARAGRAPH, "en", 5), ("a", PARAGRAPH, "en", 9), ("c", near, "en", 7),
                  ("d", PARAGRAPH, "de", 8), ("b", "Another text entirely, unrelated.", "en", 6),
                  ("e", "Nothing like the others at all.", "en", 1)])
    groups = DuplicateGroups()
    groups.add(keys.sort_by("key"))
    decisions = {row["seq"]: (row["reason"], row["detail"]) for row in resolve_duplicates(groups, 0.85).to_pylist()}
    assert decisions == {
        6: ("duplicate_id", "field 'id': 'b' is already the id of the record at f.jsonl:5"),
        9: ("exact_duplicate", "field 'text': same text as kept id 'b'"),
        7: ("near_duplicate", "field 'text': near-duplicate of kept id 'b' (estimated Jaccard >= 0.85)"),
    }   # 'd' has the same text but another language (per_language)
    assert set(_keys([("x", "t", "en", 1)], per_language=False)["key"].to_pylist()[1:2]) == {
        "e|*|" + __import__("hashlib").blake2b(b"t", digest_size=16).hexdigest()}


def test_repeated_keys_keeps_groups_and_block_edges():
    block = pa.table({"key": ["a", "b", "b", "c", "d", "e", "e"], "seq": list(range(7)), "id": list("0123456"),
                      "origin": [None] * 7, "sketch": [None] * 7}, schema=KEY_SCHEMA)
    assert repeated_keys(block)["key"].to_pylist() == ["a", "b", "b", "e", "e"]
    assert repeated_keys(block.slice(3, 2))["key"].to_pylist() == ["c", "d"]   # edges may continue elsewhere
    assert np.array_equal(repeated_keys(block.slice(0, 0))["seq"].to_numpy(), [])
