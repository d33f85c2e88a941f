"""Retrieval metrics agree with pytrec_eval (the trec_eval reference) to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest

from babelforge.eval.metrics import compute_metrics, parse_metric, rank_run, same_language_at_k

pytrec_eval = pytest.importorskip("pytrec_eval")

TREC_MEASURES = {"ndcg_cut.10", "recall.1", "recall.10", "recall.100", "recip_rank"}
OURS_TO_TREC = {"ndcg@10": "ndcg_cut_10", "recall@1": "recall_1", "recall@10": "recall_10",
                "recall@100": "recall_100"}


def _random_fixture(seed: int, n_queries: int = 40, n_docs: int = 300):
    """Graded qrels (0-3, several relevant per query), runs with many score ties."""
    rng = np.random.default_rng(seed)
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, list[tuple[str, float]]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.choice(n_docs, size=int(rng.integers(1, 12)), replace=False)
        qrels[qid] = {f"d{d}": int(rng.integers(0, 4)) for d in judged}
        retrieved = rng.choice(n_docs, size=int(rng.integers(5, 150)), replace=False)
        # One decimal: many exact ties, broken by docid as trec_eval does.
        run[qid] = [(f"d{d}", float(np.round(rng.random(), 1))) for d in retrieved]
    qrels["q_all_nonrelevant"] = {"d1": 0, "d2": 0}
    run["q_all_nonrelevant"] = [("d1", 0.5), ("d3", 0.4)]
    qrels["q_nothing_found"] = {"d7": 2, "d8": 1}
    run["q_nothing_found"] = [("d9", 0.9), ("d10", 0.8)]
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_pytrec_eval(seed):
    qrels, run = _random_fixture(seed)
    ours = compute_metrics(run, qrels, ["ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10"])
    trec_run = {q: {d: s for d, s in pairs} for q, pairs in run.items()}
    trec = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(trec_run)
    # trec_eval's recip_rank is uncut; on runs truncated to the top 10 it equals MRR@10.
    top10 = {q: {d: trec_run[q][d] for d in ranked[:10]} for q, ranked in rank_run(run).items()}
    trec_top10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert set(trec) == set(ours.query_ids)
    for row, qid in enumerate(ours.query_ids):
        for name, trec_name in OURS_TO_TREC.items():
            assert ours.values[name][row] == pytest.approx(trec[qid][trec_name], abs=1e-6), (qid, name)
        assert ours.values["mrr@10"][row] == pytest.approx(trec_top10[qid]["recip_rank"], abs=1e-6), qid
    assert ours.values["ndcg@10"][ours.query_ids.index("q_nothing_found")] == 0.0
    assert ours.values["recall@100"][ours.query_ids.index("q_nothing_found")] == 0.0


def test_ties_are_broken_by_docid_descending_like_trec_eval():
    qrels = {"q": {"a": 1}}
    run = {"q": [("a", 1.0), ("b", 1.0), ("c", 0.5)]}
    assert rank_run(run) == {"q": ["b", "a", "c"]}
    assert compute_metrics(run, qrels, ["mrr@10"]).mean()["mrr@10"] == 0.5
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({"q": {"a": 1.0, "b": 1.0, "c": 0.5}})
    assert trec["q"]["recip_rank"] == 0.5


def test_mrr_is_cut_at_k_and_missing_queries_score_zero():
    qrels = {"q1": {"d11": 1}, "q2": {"x": 1}}
    run = {"q1": [(f"d{i}", 1.0 - i / 100) for i in range(12)]}  # relevant doc at rank 12
    result = compute_metrics(run, qrels, ["mrr@10", "recall@100", "ndcg@10"])
    assert result.values["mrr@10"].tolist() == [0.0, 0.0]
    assert result.values["recall@100"].tolist() == [1.0, 0.0]
    assert result.mean()["ndcg@10"] == 0.0


def test_parse_metric_rejects_unknown_names():
    assert parse_metric("recall@100") == ("recall", 100)
    for bad in ("map@10", "ndcg", "ndcg@0", "NDCG@10"):
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)


def test_same_language_at_k_counts_non_relevant_same_language_hits():
    qrels = {"en:1": {"de:1": 1, "fr:1": 1}}
    rankings = {"en:1": ["en:2", "de:1", "en:3", "fr:2", "fr:1"]}
    doc_langs = {"en:2": "en", "en:3": "en", "de:1": "de", "fr:1": "fr", "fr:2": "fr"}
    result = same_language_at_k(rankings, qrels, {"en:1": "en"}, doc_langs, k=4)
    assert result.mean() == {"same_lang@4": 0.5}
