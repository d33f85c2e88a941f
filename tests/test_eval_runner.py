"""The evaluation runner: injected perfect / random / language-biased embeddings give the
expected scores; the tiny model scores the same through Ray and in process; reports are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from babelforge.eval.bitext import ntrex_crosslingual_task, ntrex_monolingual_task, ntrex_multilingual_task
from babelforge.eval.datasets import RetrievalTask
from babelforge.eval.report import compare_by_dimension, compare_reports, load_report, report_markdown, write_report
from babelforge.eval.runner import EmbeddingTable, default_dims, evaluate, evaluate_embeddings, texts_to_encode

LANGS = ["en", "de", "zh"]
LINES = range(40)


def _line_table(tasks, dim=64, language_weight=0.0, seed=0):
    """Embeddings keyed on NTREX line identity: every translation of line i gets the same vector
    (a "perfect" cross-lingual model), optionally plus a per-language direction (a biased one)."""
    rng = np.random.default_rng(seed)
    line_vectors = rng.standard_normal((2000, dim))
    lang_vectors = {lang: rng.standard_normal(dim) for lang in LANGS}
    mapping = {}
    for task in tasks:
        for side, texts, prompt in (("q", task.queries, task.query_prompt), ("d", task.corpus, task.corpus_prompt)):
            for tid, text in texts.items():
                lang, line = tid.split(":")
                vec = line_vectors[int(line)] / np.sqrt(dim) + language_weight * lang_vectors[lang]
                mapping[(prompt, text)] = vec / np.linalg.norm(vec)
    return EmbeddingTable.from_mapping(mapping)


def test_perfect_embeddings_score_one():
    tasks = [ntrex_crosslingual_task("de", "en", LINES), ntrex_multilingual_task(LANGS, LINES)]
    report = evaluate_embeddings(tasks, _line_table(tasks), dims=[64, 32])
    for task in report.tasks:
        for dim in (64, 32):
            assert task.metrics[dim]["ndcg@10"] == pytest.approx(1.0)
            assert task.metrics[dim]["recall@1"] == pytest.approx(1.0 if task.setting == "cross-lingual" else 0.5)
            assert task.metrics[dim]["mrr@10"] == pytest.approx(1.0)
    pool = report.task("ntrex/pool-en-de-zh")
    assert set(pool.by_query_lang[64]) == set(LANGS)
    assert report.aggregates() == {"cross-lingual": {64: pytest.approx(1.0), 32: pytest.approx(1.0)},
                                   "multilingual": {64: pytest.approx(1.0), 32: pytest.approx(1.0)}}


def test_language_biased_embeddings_rank_same_language_distractors_first():
    pool = ntrex_multilingual_task(LANGS, LINES)
    report = evaluate_embeddings([pool], _line_table([pool], language_weight=3.0), dims=[64])
    metrics = report.task(pool.name).metrics[64]
    assert metrics["same_lang@10"] == pytest.approx(1.0)   # all of the top 10 is the query's language
    assert metrics["ndcg@10"] == pytest.approx(0.0)
    assert report.language_bias() == {64: pytest.approx(1.0)}
    unbiased = evaluate_embeddings([pool], _line_table([pool]), dims=[64]).task(pool.name).metrics[64]
    assert unbiased["same_lang@10"] < 0.6   # 8 non-relevant slots, 1/3 of the distractors share the language


def test_random_embeddings_score_at_chance():
    n_docs, n_queries = 100, 3000
    task = RetrievalTask(name="random", setting="monolingual", query_lang="en", corpus_langs=("en",),
                         queries={f"q{i}": f"query {i}" for i in range(n_queries)},
                         corpus={f"d{j}": f"doc {j}" for j in range(n_docs)},
                         qrels={f"q{i}": {f"d{i % n_docs}": 1} for i in range(n_queries)})
    keys = texts_to_encode([task])
    vectors = np.random.default_rng(7).standard_normal((len(keys), 128)).astype(np.float32)
    table = EmbeddingTable(vectors=vectors, rows={k: i for i, k in enumerate(keys)})
    metrics = evaluate_embeddings([task], table, dims=[128]).task("random").metrics[128]
    # The relevant document's rank is uniform over 1..100.
    expected_ndcg = sum(1 / np.log2(r + 1) for r in range(1, 11)) / n_docs
    expected_mrr = sum(1 / r for r in range(1, 11)) / n_docs
    assert metrics["recall@10"] == pytest.approx(0.10, abs=0.02)
    assert metrics["ndcg@10"] == pytest.approx(expected_ndcg, abs=0.01)
    assert metrics["mrr@10"] == pytest.approx(expected_mrr, abs=0.01)
    assert metrics["recall@100"] == 1.0   # k = 100 covers the whole corpus


def test_default_dims_halve_down_to_32():
    assert default_dims(384) == [384, 192, 96, 48]
    assert default_dims(1024) == [1024, 512, 256, 128, 64, 32]
    assert default_dims(32) == [32]


def test_texts_are_encoded_once_per_prompt():
    tasks = [ntrex_crosslingual_task("de", "en", LINES), ntrex_crosslingual_task("en", "de", LINES),
             ntrex_multilingual_task(["en", "de"], LINES), ntrex_monolingual_task("de", LINES)]
    keys = texts_to_encode(tasks)
    assert len(keys) == len(set(keys))
    # Sentences share the "query" prompt across all three sentence tasks; passages add their own.
    assert sum(prompt == "query" for prompt, _ in keys) == 80
    assert sum(prompt == "passage" for prompt, _ in keys) == len(tasks[3].corpus)


@pytest.fixture(scope="module")
def small_tasks():
    return [ntrex_crosslingual_task("de", "en", range(30)),
            ntrex_monolingual_task("ru", range(30), passage_sentences=4),
            ntrex_multilingual_task(["en", "zh", "ar"], range(20), max_queries=10)]


def test_tiny_model_same_scores_with_and_without_ray(tiny_encoder_dir, ray_local, small_tasks, tmp_path):
    local = evaluate(tiny_encoder_dir, small_tasks, dims=[32, 16, 8], use_ray=False, batch_size=16)
    distributed = evaluate(tiny_encoder_dir, small_tasks, dims=[32, 16, 8], use_ray=True, batch_size=16, actors=1)
    assert local.dims == distributed.dims == [32, 16, 8]
    for a, b in zip(local.tasks, distributed.tasks):
        assert a.name == b.name
        for dim in local.dims:
            for metric, value in a.metrics[dim].items():
                assert b.metrics[dim][metric] == pytest.approx(value, abs=1e-5), (a.name, dim, metric)
    assert local.timing["texts_encoded"] == distributed.timing["texts_encoded"] > 0

    paths = write_report(distributed, tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert [t["name"] for t in saved["tasks"]] == ["ntrex/de-en", "ntrex/ru-p4", "ntrex/pool-en-zh-ar"]
    assert saved["dims"] == [32, 16, 8] and set(saved["tasks"][0]["metrics"]) == {"32", "16", "8"}
    assert set(saved["aggregates"]["ndcg@10"]) == {"monolingual", "cross-lingual", "multilingual"}
    markdown = paths["markdown"].read_text()
    for name in ("ntrex/de-en", "ntrex/ru-p4", "ntrex/pool-en-zh-ar", "| task | 32 | 16 | 8 |", "same-lang@10"):
        assert name in markdown
    reloaded = load_report(tmp_path / "eval")
    assert reloaded.task("ntrex/de-en").metrics == distributed.task("ntrex/de-en").metrics
    assert report_markdown(reloaded) == markdown


def test_compare_reports_shows_deltas_per_task_and_setting():
    tasks = [ntrex_crosslingual_task("de", "en", LINES), ntrex_multilingual_task(LANGS, LINES)]
    before = evaluate_embeddings(tasks, _line_table(tasks, language_weight=3.0), dims=[64, 32], model="base")
    after = evaluate_embeddings(tasks, _line_table(tasks), dims=[64], model="trained")
    table = compare_reports(before, after)
    assert "nDCG@10 at dimension 64" in table and "`base` (before) vs `trained` (after)" in table
    pool_row = next(line for line in table.splitlines() if line.startswith("| ntrex/pool-en-de-zh |"))
    assert pool_row.endswith("| 0.00 | 100.00 | +100.00 |")
    assert "**mean multilingual**" in table and "same-lang@10" in table
    with pytest.raises(ValueError, match="not in both reports"):
        compare_reports(before, after, dim=32)


def test_compare_by_dimension_shows_each_shared_dimension_per_setting():
    tasks = [ntrex_crosslingual_task("de", "en", LINES), ntrex_multilingual_task(LANGS, LINES)]
    before = evaluate_embeddings(tasks, _line_table(tasks, language_weight=3.0), dims=[64, 32], model="base")
    after = evaluate_embeddings(tasks, _line_table(tasks), dims=[64, 32, 16], model="trained")
    table = compare_by_dimension(before, after, labels=("base", "trained"))
    assert "| setting | 64 | 32 |" in table and "| 16 |" not in table   # only dimensions both reports have
    multilingual = next(line for line in table.splitlines() if line.startswith("| mean multilingual |"))
    assert multilingual.count("0.00 → 100.00 (+100.00)") == 2
    assert "same-lang@10 (lower is better)" in table
