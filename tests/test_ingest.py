"""The ingest stage end to end on a local Ray cluster: quarantine accounting, dedup, splitting, resume, URIs."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.cli import main as babelforge_main
from babelforge.data.config import IngestConfig
from babelforge.data.ingest import run_ingest
from babelforge.data.shards import ShardWriter
from babelforge.errors import ConfigError
from babelforge.schema import CORPUS_SCHEMA

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH = ("Rivers carry sediment from the mountains to the sea, building deltas over thousands of years. "
             "Farmers have long settled on these fertile plains, where floods renew the soil each spring. "
             "Engineers now build levees and dams that hold the water back but also starve the deltas of mud, "
             "so coastlines retreat while cities grow on land that slowly sinks below the rising tide.")


def _jsonl(path: Path, records: list, compress: bool = False) -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records]
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if compress else data)


def _config(tmp_path: Path, sources: list, **overrides) -> IngestConfig:
    return IngestConfig.model_validate({"output_dir": str(tmp_path / "out"), "sources": sources, **overrides})


def _kept(output_dir: Path) -> dict[str, dict]:
    tables = [pq.read_table(p) for p in sorted((output_dir / "data").glob("*.parquet"))]
    assert all(t.schema == CORPUS_SCHEMA for t in tables)
    return {row["id"]: row for t in tables for row in t.to_pylist()}


def _quarantine(output_dir: Path) -> list[dict]:
    return list(ShardWriter(str(output_dir), stage="ingest", schema=CORPUS_SCHEMA).iter_quarantine())


@pytest.fixture()
def bad_records(tmp_path):
    """Every kind of bad record across jsonl (plain and gzip), parquet and text; 30 rows, 7 of them good."""
    root = tmp_path / "in"
    (root / "tables").mkdir(parents=True)
    _jsonl(root / "docs.jsonl", [
        {"doc_id": "j1", "text": "Der schnelle braune Fuchs springt über den faulen Hund.", "lang": "de", "url": "u1"},
        {"doc_id": "j2", "text": "The quick brown fox jumps over the lazy dog and runs far away."},  # lang detected
        b'{"doc_id": "j3", "text": "broken',                                                    # invalid_json
        b"",                                                                                     # invalid_json
        b"[1, 2, 3]",                                                                            # not_an_object
        b'{"doc_id": "j6", "text": "caf\xe9 au lait"}',                                          # invalid_utf8
        {"doc_id": "j7", "lang": "en"},                                                          # missing_text
        {"doc_id": "j8", "text": 42},                                                            # non_string_text
        {"doc_id": "j9", "text": "  \t\x00  "},                                                  # empty_text
        {"doc_id": "j10", "text": "Hi"},                                                         # too_short
        {"doc_id": "j11", "text": "Far too long. " * 20, "lang": "en"},                          # too_long
        {"doc_id": "j12", "text": "A sentence with a bogus language tag.", "lang": "klingon"},   # invalid_language
        {"text": "This record has no identifier at all, sadly."},                                # invalid_id
        {"doc_id": "j1", "text": "Another English sentence that reuses the first identifier."},  # duplicate_id
        {"doc_id": "j15", "text": "12345 67890 12345 67890"},                                    # undetected_language
        {"doc_id": "j16", "text": "Ceci est une phrase française tout à fait ordinaire.", "lang": "fr"},  # disallowed
        {"doc_id": "j17", "text": "This sentence is clearly written in English.", "lang": "de"},  # language_mismatch
    ])
    _jsonl(root / "more.jsonl.gz", [
        {"doc_id": "g1", "text": "El perro come la comida en la cocina todos los días.", "lang": "es"},
        b"not json at all",                                                                      # invalid_json
        {"doc_id": "g3", "text": "Mañana vamos a la playa con nuestros amigos españoles.", "lang": "es"},
    ], compress=True)
    pq.write_table(pa.table({
        "id": pa.array([1, 2, 3, None], pa.int64()),
        "body": pa.array([b"Das ist ein weiterer deutscher Satz \xc3\xbcber das Wetter.", b"\xff\xfe bad bytes", None,
                          b"Ein Satz ohne Kennung, der trotzdem gelesen werden muss."], pa.binary()),
        "lang": ["de", "de", "de", "de"]}),
        root / "tables" / "table.parquet")   # kept, invalid_utf8, missing_text, invalid_id
    pq.write_table(pa.table({"id": [10, 11], "body": [1, 2], "lang": ["de", "de"]}),
                   root / "tables" / "numbers.parquet")                       # non_string_text x2
    (root / "tables" / "README.md").write_text("not data\n")                  # skipped: unknown extension
    (root / "lines.txt").write_bytes("今日はとても良い天気ですね。散歩に行きましょう。\n\n".encode()
                                     + b"\xe4\xbb\x8a\xff\n"                         # empty_text, invalid_utf8
                                     + "日本語の文章をもう一つここに書いておきます。\n".encode())
    return root


def test_every_bad_record_is_quarantined_with_its_reason_and_nothing_is_lost(ray_local, tmp_path, bad_records):
    cfg = _config(tmp_path, [
        {"path": str(bad_records / "*.jsonl*"), "id_field": "doc_id", "lang_field": "lang", "meta_fields": ["url"]},
        {"path": str(bad_records / "tables"), "text_field": "body", "id_field": "id", "lang_field": "lang"},
        {"path": str(bad_records / "lines.txt"), "lang": "ja", "name": "jp-lines"},
    ], min_chars=5, max_chars=200, overlong="drop",
        langid={"allowed_langs": ["de", "en", "es", "ja"], "min_confidence": 0.5, "verify": True})
    summary = run_ingest(cfg)

    assert summary.quarantined == {
        "invalid_json": 3, "not_an_object": 1, "invalid_utf8": 3, "missing_text": 2, "non_string_text": 3,
        "empty_text": 2, "too_short": 1, "too_long": 1, "invalid_language": 1, "invalid_id": 2, "duplicate_id": 1,
        "undetected_language": 1, "disallowed_language": 1, "language_mismatch": 1}
    assert (summary.rows_in, summary.kept) == (30, 7)
    assert summary.rows_in == summary.kept + sum(summary.quarantined.values())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["rows_in"], manifest["kept"], manifest["quarantined"]) == (30, 7, summary.quarantined)
    assert summary.extra["lang_detected"] == 2   # j2 (kept) and j1's id clash (quarantined after detection)

    kept = _kept(tmp_path / "out")
    assert set(kept) == {"j1", "j2", "g1", "g3", "1"} | {r for r in kept if kept[r]["source"] == "jp-lines"}
    assert kept["j2"]["lang"] == "en" and kept["1"]["text"].startswith("Das ist ein weiterer deutscher Satz über")
    assert json.loads(kept["j1"]["meta"]) == {"url": "u1", "file": "docs.jsonl", "line": 1}
    assert json.loads(kept["1"]["meta"]) == {"file": "table.parquet", "row": 0}

    by_reason = {}
    for q in _quarantine(tmp_path / "out"):
        assert q["stage"] == "ingest"
        by_reason.setdefault(q["reason"], []).append(q)
    utf8 = {q["source"].rsplit("/", 1)[1]: q for q in by_reason["invalid_utf8"]}
    assert set(utf8) == {"docs.jsonl:6", "table.parquet[1]", "lines.txt:3"}
    assert utf8["docs.jsonl:6"]["record"] == '{"doc_id": "j6", "text": "caf\\xe9 au lait"}'
    assert json.loads(utf8["table.parquet[1]"]["record"])["body"] == "\\xff\\xfe bad bytes"
    assert "field 'body' is not valid UTF-8" in utf8["table.parquet[1]"]["detail"]
    assert sorted(q["record"] for q in by_reason["invalid_json"]) == ["", "not json at all",
                                                                      '{"doc_id": "j3", "text": "broken']
    assert {q["detail"] for q in by_reason["missing_text"]} == {"field 'text' is missing", "field 'body' is null"}
    assert {q["detail"] for q in by_reason["non_string_text"]} == {
        "field 'text' is an integer, expected a string"} | {"field 'body' is an integer, expected a string"}
    assert by_reason["duplicate_id"][0]["detail"].startswith("field 'id': 'j1' is already the id of the record at ")
    assert by_reason["duplicate_id"][0]["detail"].endswith("docs.jsonl:1")
    assert "field 'lang' declares 'de'" in by_reason["language_mismatch"][0]["detail"]
    assert "field 'lang' is 'fr', not in langid.allowed_langs" in by_reason["disallowed_language"][0]["detail"]


def test_exact_and_near_duplicates_are_removed_across_files_and_shards(ray_local, tmp_path):
    near = PARAGRAPH.replace("thousands", "millions")
    cafe = "Café au lait, s'il vous plaît, avec un peu de sucre."
    _jsonl(tmp_path / "a.jsonl", [
        {"id": "a1", "text": PARAGRAPH, "lang": "en"},
        {"id": "a2", "text": PARAGRAPH, "lang": "en"},                       # exact
        {"id": "a3", "text": near, "lang": "en"},                            # near
        {"id": "a4", "text": "Completely different: a recipe for bread with flour, water and salt.", "lang": "en"},
        {"id": "a5", "text": PARAGRAPH, "lang": "de"},                       # same text, other language: kept
        {"id": "a6", "text": "  " + PARAGRAPH.replace(". ", ".   ") + " ", "lang": "en"},  # not exact: spacing
    ])
    _jsonl(tmp_path / "b.jsonl", [
        {"id": "b1", "text": unicodedata.normalize("NFC", cafe), "lang": "fr"},
        {"id": "b2", "text": unicodedata.normalize("NFD", cafe), "lang": "fr"},   # exact after NFC
        {"id": "b3", "text": PARAGRAPH, "lang": "en"},                            # exact, other file
    ])
    summary = run_ingest(_config(tmp_path, [{"path": str(tmp_path / "*.jsonl"), "id_field": "id",
                                             "lang_field": "lang"}], rows_per_shard=2, langid={"enabled": False}))
    assert summary.shards == 5
    assert summary.quarantined == {"exact_duplicate": 3, "near_duplicate": 2}
    assert set(_kept(tmp_path / "out")) == {"a1", "a4", "a5", "b1"}
    details = {json.loads(q["record"])["id"]: (q["reason"], q["detail"]) for q in _quarantine(tmp_path / "out")}
    assert details == {
        "a2": ("exact_duplicate", "field 'text': same text as kept id 'a1'"),
        "b2": ("exact_duplicate", "field 'text': same text as kept id 'b1'"),
        "b3": ("exact_duplicate", "field 'text': same text as kept id 'a1'"),
        "a3": ("near_duplicate", "field 'text': near-duplicate of kept id 'a1' (estimated Jaccard >= 0.85)"),
        "a6": ("near_duplicate", "field 'text': near-duplicate of kept id 'a1' (estimated Jaccard >= 0.85)"),
    }


def test_overlong_texts_are_split_into_chunks_and_counted(ray_local, tmp_path):
    _jsonl(tmp_path / "in.jsonl", [{"text": "Tiny end.\n\n" + PARAGRAPH}, {"text": "A short one."}])
    summary = run_ingest(_config(tmp_path, [{"path": str(tmp_path / "in.jsonl"), "lang": "en"}], max_chars=100,
                                 min_chars=10, overlong="split", dedup={"near": False}))
    kept = _kept(tmp_path / "out")
    chunks = sorted((r for r in kept.values() if "#" in r["id"]), key=lambda r: r["id"])
    parent = chunks[0]["id"].split("#")[0]
    assert [r["id"] for r in chunks] == [f"{parent}#{k}" for k in (1, 2, 3, 4)]
    assert all(len(r["text"]) <= 100 for r in chunks) and chunks[0]["text"].startswith("Rivers carry sediment")
    [short_chunk] = _quarantine(tmp_path / "out")   # "Tiny end." is a paragraph of its own, below min_chars
    assert short_chunk["reason"] == "too_short" and json.loads(short_chunk["record"]) == {
        "id": f"{parent}#0", "text": "Tiny end."}
    assert summary.extra["split_texts"] == 1 and summary.extra["split_extra_rows"] == 4
    assert (summary.rows_in, summary.kept) == (2, 5)
    assert summary.rows_in + summary.extra["split_extra_rows"] == summary.kept + sum(summary.quarantined.values())


def test_an_interrupted_run_resumes_from_its_committed_shards(ray_local, tmp_path):
    for lang, words in (("en", "one two three"), ("de", "eins zwei drei"), ("fr", "un deux trois")):
        (tmp_path / f"{lang}.txt").write_text("\n".join(f"{w} {lang} line" for w in words.split()) + "\n")
    sources = [{"path": str(tmp_path / f"{lang}.txt"), "lang": lang} for lang in ("en", "de", "fr")]
    cfg = _config(tmp_path, sources, rows_per_shard=2)
    out = tmp_path / "out"
    committed: list[tuple[str, str]] = []

    def crash_after(phase: str, count: int):
        def hook(hook_phase, stats):
            committed.append((hook_phase, stats.shard))
            if hook_phase == phase and sum(p == phase for p, _ in committed) == count:
                raise KeyboardInterrupt(f"simulated crash in {phase}")
        return hook

    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg, on_shard_committed=crash_after("validate", 1))
    staging = out / "_ingest" / "staging"
    first = "00-en.txt-00000"
    assert committed == [("validate", first)] and [p.name for p in (staging / "_done").iterdir()] == [f"{first}.json"]
    first_staged = (staging / "data" / f"{first}.parquet").stat().st_mtime_ns

    committed.clear()
    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg, on_shard_committed=crash_after("dedup", 1))
    assert [s for p, s in committed if p == "validate"] == ["00-en.txt-00001", "01-de.txt-00000", "01-de.txt-00001",
                                                            "02-fr.txt-00000", "02-fr.txt-00001"]
    assert (staging / "data" / f"{first}.parquet").stat().st_mtime_ns == first_staged
    assert [s for p, s in committed if p == "dedup"] == [first]
    first_final = (out / "data" / f"{first}.parquet").stat().st_mtime_ns

    committed.clear()
    summary = run_ingest(cfg, on_shard_committed=crash_after("never", 1))
    assert [p for p, _ in committed] == ["dedup"] * 5 and first not in [s for _, s in committed]
    assert (out / "data" / f"{first}.parquet").stat().st_mtime_ns == first_final
    assert (summary.shards, summary.resumed_shards, summary.rows_in, summary.kept) == (6, 1, 9, 9)
    assert summary.extra["validated_shards"] == 0 and summary.extra["resumed_validated_shards"] == 6
    assert not staging.exists() and (out / "_ingest" / "plan.json").exists()
    assert sorted(r["text"] for r in _kept(out).values())[:2] == ["deux fr line", "drei de line"]

    committed.clear()
    assert run_ingest(cfg, on_shard_committed=crash_after("never", 1)).kept == 9 and committed == []
    with pytest.raises(ConfigError, match=r"other settings \(changed: dedup.threshold, min_chars\)"):
        run_ingest(cfg.model_copy(update={"min_chars": 3, "dedup": cfg.dedup.model_copy(update={"threshold": 0.9})}))


def test_uri_inputs_and_outputs(ray_local, tmp_path):
    _jsonl(tmp_path / "in.jsonl", [{"text": "Une phrase en français, lue par une URI."}, {"text": ""}])
    cfg = IngestConfig.model_validate({"output_dir": f"file://{tmp_path}/out",
                                       "sources": [{"path": f"file://{tmp_path}/*.jsonl"}]})
    summary = run_ingest(cfg)
    assert (summary.rows_in, summary.kept, summary.quarantined) == (2, 1, {"empty_text": 1})
    [row] = _kept(tmp_path / "out").values()
    assert row["lang"] == "fr" and row["source"] == f"file://{tmp_path}/*.jsonl"


def test_cli_ingests_the_bundled_corpora(ray_local, tmp_path, capsys):
    sources = "[{bundled: ntrex, languages: [de, en]}, {bundled: tatoeba, languages: [de, fr]}]"
    code = babelforge_main(["ingest", "--config", str(REPO / "jobs" / "configs" / "ingest.yaml"),
                            "--set", f"output_dir={tmp_path / 'out'}", "--set", f"sources={sources}"])
    assert code == 0
    report = capsys.readouterr().out
    assert "[ingest] shards=6 rows in=7994" in report
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["quarantined"]["exact_duplicate"] >= 228   # English sides shared by deu-eng and fra-eng
    assert manifest["quarantined"]["eval_contamination"] == 2 * 410   # decontaminate.ntrex_heldout: 410 lines
    assert manifest["rows_in"] == manifest["kept"] + sum(manifest["quarantined"].values())
    langs = {(r["source"], r["lang"]) for r in _kept(tmp_path / "out").values()}
    assert langs == {("ntrex", "de"), ("ntrex", "en"), ("tatoeba", "de"), ("tatoeba", "fr"), ("tatoeba", "en")}
