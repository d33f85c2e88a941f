"""Evaluation-set decontamination in ingest: the canonical form, the index, record rules, config, end to end."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from babelforge.config import load_config_dict
from babelforge.data.config import DecontaminateConfig, IngestConfig
from babelforge.data.decontaminate import EvalTextIndex, build_eval_index, text_file_texts
from babelforge.data.ingest import run_ingest
from babelforge.data.normalize import canonical_text
from babelforge.data.readers import RawRecord
from babelforge.data.shards import ShardWriter
from babelforge.data.validate import REASONS, RecordContext, process_records
from babelforge.errors import ConfigError, DataFormatError
from babelforge.resources import NTREX_FILES
from babelforge.schema import CORPUS_SCHEMA

SENTENCE = "Zebras cross the river at dawn."


def _config(**overrides) -> IngestConfig:
    return IngestConfig.model_validate({"output_dir": "/tmp/unused", "sources": [{"path": "in.jsonl", "lang": "en"}],
                                        **overrides})


def _rows(text: str, index: EvalTextIndex, **overrides) -> list[dict]:
    record = RawRecord("in.jsonl:1", {"line": 1}, json.dumps({"text": text}), {"text": text})
    return process_records([record], RecordContext.create(_config(**overrides), 0, "in.jsonl", "en", index))


# ------------------------------------------------------------------------------- canonical form & index

def test_canonical_form_folds_normalisation_case_and_whitespace():
    assert canonical_text(" Straße\u00a0 CAFE\u0301\r\n\tbar ") == "strasse café bar"
    assert canonical_text(unicodedata.normalize("NFD", "Café")) == canonical_text("CAFÉ")
    assert canonical_text("E = mc²", "NFC") == "e = mc²" and canonical_text("E = mc²", "NFKC") == "e = mc2"


def test_text_files_are_read_line_by_line_from_paths_compressed_files_and_uris(tmp_path):
    (tmp_path / "eval.txt").write_text(f"  {SENTENCE.upper()}  \n\n   \nSecond evaluation text.\r\n")
    (tmp_path / "more.txt.gz").write_bytes(gzip.compress(b"Second  evaluation text.\nThird one."))
    fsspec.filesystem("memory").pipe("/eval/queries.txt", "Eine Frage auf Deutsch?\n".encode())
    files = [str(tmp_path / "eval.txt"), str(tmp_path / "more.txt.gz"), "memory://eval/queries.txt"]
    index = EvalTextIndex.from_texts(text_file_texts(files), "NFC")

    assert len(index) == 4   # blank lines are skipped; the repeated text keeps its first source
    assert index.match("zebras cross\nthe  river at DAWN.") == f"{files[0]}:1"
    assert index.match("second evaluation text.") == f"{files[0]}:4"
    assert index.match("THIRD ONE.") == f"{files[1]}:2"
    assert index.match("eine frage auf deutsch?") == "memory://eval/queries.txt:1"
    assert index.match("Zebras cross the river at dawn") is None   # exact text: the full stop matters
    assert EvalTextIndex.from_texts(text_file_texts(files[::-1]), "NFC").fingerprint() != index.fingerprint()


def test_ntrex_heldout_index_holds_every_languages_heldout_lines():
    from babelforge.eval.bitext import read_ntrex, split_ntrex_lines

    index = build_eval_index(DecontaminateConfig(ntrex_heldout=True), "NFC")
    split = split_ntrex_lines()
    de, en = read_ntrex("de"), read_ntrex("en")
    held, train = split.heldout_lines[0], split.train_lines[0]
    assert index.match(de[held]) == f"held-out NTREX line ntrex.deu.txt:{held + 1}"
    assert index.match(en[held].lower()) == f"held-out NTREX line ntrex.eng-US.txt:{held + 1}"
    assert index.match(de[train]) is None
    assert len(index) <= len(NTREX_FILES) * len(split.heldout_lines)
    assert build_eval_index(DecontaminateConfig(), "NFC") is None


# -------------------------------------------------------------------------------------------- records

def test_whole_texts_chunks_and_truncations_matching_an_eval_text_are_quarantined():
    index = EvalTextIndex.from_texts([(SENTENCE, "eval.txt:3")], "NFC")
    [row] = _rows(f"  {SENTENCE.lower()} ", index)
    assert row["_reject_reason"] == "eval_contamination" and row["id"] is not None
    assert row["_reject_detail"] == "field 'text' matches eval.txt:3"
    assert row["_reject_record"] == json.dumps({"text": f"  {SENTENCE.lower()} "})

    long_text = f"{SENTENCE}\n\nA different paragraph follows the evaluation sentence here."
    chunks = _rows(long_text, index, max_chars=70, overlong="split")
    assert [(r["_chunk"], r.get("_reject_reason")) for r in chunks] == [(0, "eval_contamination"), (1, None)]
    assert chunks[0]["_reject_detail"] == "field 'text': chunk 0 of the split text matches eval.txt:3"
    [truncated] = _rows(f"{SENTENCE} And then some more words at the end.", index, max_chars=33,
                        overlong="truncate")
    assert truncated["_reject_detail"] == "field 'text' truncated to max_chars=33 matches eval.txt:3"

    assert [r.get("_reject_reason") for r in _rows(long_text, index, max_chars=1000)] == [None]
    assert [r.get("_reject_reason") for r in _rows(SENTENCE, None)] == [None]
    assert "eval_contamination" in REASONS


# --------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("section, key", [
    ({"ntrex_held_out": True}, "decontaminate.ntrex_held_out: unknown key"),
    ({"holdout_fraction": 1.5}, "decontaminate.holdout_fraction: Input should be less than or equal to 1"),
    ({"text_files": "eval.txt"}, "decontaminate.text_files: Input should be a valid list"),
])
def test_config_errors_name_the_decontaminate_key(section, key):
    with pytest.raises(ConfigError) as err:
        load_config_dict({"output_dir": "/tmp/out", "sources": [{"bundled": "ntrex"}], "decontaminate": section},
                         IngestConfig, source="ingest.yaml")
    assert key in str(err.value)


def test_unreadable_text_files_name_the_key_or_the_line(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    with pytest.raises(ConfigError, match=r"decontaminate.text_files\[1\]: '.*missing.txt' does not exist"):
        build_eval_index(DecontaminateConfig(text_files=[str(tmp_path / "ok.txt"), str(tmp_path / "missing.txt")]),
                         "NFC")
    with pytest.raises(ConfigError, match=r"decontaminate.text_files\[0\]: '.*' is not a file"):
        build_eval_index(DecontaminateConfig(text_files=[str(tmp_path)]), "NFC")
    (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: not valid UTF-8 .*decontaminate.text_files\[0\]"):
        build_eval_index(DecontaminateConfig(text_files=[str(tmp_path / "bad.txt")]), "NFC")


def test_decontaminate_is_part_of_the_fingerprint_only_when_enabled():
    assert "decontaminate" not in _config().fingerprint()
    assert "decontaminate" not in _config(decontaminate={"holdout_fraction": 0.3}).fingerprint()
    assert _config(decontaminate={"ntrex_heldout": True}).fingerprint()["decontaminate"] == {
        "ntrex_heldout": True, "holdout_fraction": None, "seed": None, "text_files": []}


# ----------------------------------------------------------------------------------------- end to end

def _canonical(text: str) -> str:
    """The canonical form, written out independently of babelforge.data.normalize."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def test_ingest_quarantines_heldout_ntrex_and_eval_file_texts(ray_local, tmp_path):
    from babelforge.eval.bitext import read_ntrex, split_ntrex_lines

    split = split_ntrex_lines()
    de = read_ntrex("de")
    eval_file = tmp_path / "eval_texts.txt"
    eval_file.write_text(f"{SENTENCE}\nAn evaluation text that no record repeats.\n")
    (tmp_path / "web.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "w1", "text": " ZEBRAS  cross the\triver AT dawn. "},            # eval_texts.txt:1
        {"id": "w2", "text": "Zebras cross the river at dusk."},                 # kept
        {"id": "w3", "text": de[split.heldout_lines[0]].upper()},               # held-out NTREX line
        {"id": "w4", "text": de[split.train_lines[0]]},                         # a train line: exact duplicate
    ]) + "\n")
    cfg = IngestConfig.model_validate({
        "output_dir": str(tmp_path / "out"), "rows_per_shard": 500, "dedup": {"near": False},
        "sources": [{"bundled": "ntrex", "languages": ["de"]},
                    {"path": str(tmp_path / "web.jsonl"), "id_field": "id", "lang": "de"}],
        "decontaminate": {"ntrex_heldout": True, "text_files": [str(eval_file)]}})
    summary = run_ingest(cfg)

    # NTREX repeats a few sentences: a train line whose text is also a held-out text is contamination too
    heldout_texts = {_canonical(texts[i]) for texts in map(read_ntrex, NTREX_FILES) for i in split.heldout_lines}
    expected = {i for i, text in enumerate(de) if _canonical(text) in heldout_texts}
    assert set(split.heldout_lines) <= expected
    assert len(expected - set(split.heldout_lines)) <= 5
    quarantine = list(ShardWriter(str(tmp_path / "out"), stage="ingest", schema=CORPUS_SCHEMA).iter_quarantine())
    contaminated = [q for q in quarantine if q["reason"] == "eval_contamination"]
    ntrex_lines = {int(q["source"].rsplit(":", 1)[1]) - 1 for q in contaminated if "ntrex.deu.txt" in q["source"]}
    assert ntrex_lines == expected and len(contaminated) == len(expected) + 2
    details = {json.loads(q["record"])["id"]: q["detail"] for q in contaminated if "web.jsonl" in q["source"]}
    assert details == {"w1": f"field 'text' matches {eval_file}:1",
                       "w3": f"field 'text' matches held-out NTREX line ntrex.deu.txt:{split.heldout_lines[0] + 1}"}

    assert summary.quarantined["eval_contamination"] == len(expected) + 2
    assert summary.rows_in == len(de) + 4 == summary.kept + sum(summary.quarantined.values())
    kept = [row for path in (tmp_path / "out" / "data").glob("*.parquet")
            for row in pq.read_table(path, columns=["text", "source", "meta"]).to_pylist()]
    kept_lines = {json.loads(row["meta"])["line"] - 1 for row in kept if row["source"] == "ntrex"}
    duplicate_lines = {int(q["source"].rsplit(":", 1)[1]) - 1 for q in quarantine
                       if q["reason"] == "exact_duplicate" and "ntrex.deu.txt" in q["source"]}
    assert kept_lines | duplicate_lines == set(split.train_lines) - expected   # the train lines stay
    assert {row["text"] for row in kept if row["source"] != "ntrex"} == {"Zebras cross the river at dusk."}

    with pytest.raises(ConfigError, match=r"changed: decontaminate.index.sha256, decontaminate.index.texts, "
                                          r"decontaminate.text_files\)"):
        run_ingest(cfg.model_copy(update={"decontaminate": DecontaminateConfig(ntrex_heldout=True)}))
    eval_file.write_text(f"{SENTENCE}\nA different second evaluation text.\n")
    with pytest.raises(ConfigError, match=r"changed: decontaminate.index.sha256\)"):
        run_ingest(cfg)
