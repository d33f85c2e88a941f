"""Ranking metrics with trec_eval semantics, vectorised over queries with NumPy.

Metrics are named ``"<kind>@<k>"``: ``ndcg@k``, ``recall@k``, ``mrr@k``. Conventions (those of
trec_eval / pytrec_eval, which the tests check to 1e-6):

- A run maps a query id to ``(docid, score)`` pairs. They are ranked by score descending, ties by
  docid *descending* (byte order), as trec_eval does.
- nDCG@k: gain = the qrels relevance (negative values count as 0), discount ``log2(rank + 1)``,
  ideal DCG from the query's qrels, cut at ``k``.
- Recall@k and MRR@k count a document as relevant when its relevance is ``>= 1``. MRR@k is the
  reciprocal rank of the first relevant document within the top ``k`` (trec_eval's
  ``recip_rank`` is the same value uncut).
- Every query of ``qrels`` is scored; a query missing from the run scores 0 (``trec_eval -c``).

    >>> qrels = {"q1": {"d1": 2, "d2": 1}}
    >>> run = {"q1": [("d3", 0.9), ("d1", 0.8), ("d2", 0.1)]}
    >>> result = compute_metrics(run, qrels, ["ndcg@10", "recall@1", "mrr@10"])
    >>> {k: round(v, 4) for k, v in result.mean().items()}
    {'ndcg@10': 0.6697, 'recall@1': 0.0, 'mrr@10': 0.5}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_METRICS", "MAIN_METRIC", "Run", "Qrels", "QueryMetrics", "parse_metric", "rank_run",
           "compute_metrics", "metrics_from_rankings", "same_language_at_k"]

DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10")
MAIN_METRIC = "ndcg@10"
METRIC_KINDS = ("ndcg", "recall", "mrr")

Run = Mapping[str, Sequence[tuple[str, float]]]
Qrels = Mapping[str, Mapping[str, int]]

_METRIC = re.compile(r"^(ndcg|recall|mrr)@(\d+)$")


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``."""
    match = _METRIC.match(name)
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"unknown metric {name!r}; expected <kind>@<k> with kind in {METRIC_KINDS}, e.g. ndcg@10")
    return match.group(1), int(match.group(2))


@dataclass
class QueryMetrics:
    """Per-query metric values (``values[name][i]`` belongs to ``query_ids[i]``)."""

    query_ids: list[str]
    values: dict[str, np.ndarray]

    def mean(self) -> dict[str, float]:
        return {name: float(v.mean()) if len(v) else 0.0 for name, v in self.values.items()}

    def mean_by_group(self, name: str, group_of_query: Mapping[str, str]) -> dict[str, float]:
        """Mean of metric ``name`` per group (e.g. per query language), groups sorted."""
        groups = np.asarray([group_of_query[q] for q in self.query_ids])
        return {str(g): float(self.values[name][groups == g].mean()) for g in np.unique(groups)}


def rank_run(run: Run) -> dict[str, list[str]]:
    """Docids of each query ranked as trec_eval ranks them: score descending, then docid descending."""
    return {qid: [doc for doc, _ in sorted(pairs, key=lambda p: (float(p[1]), p[0]), reverse=True)]
            for qid, pairs in run.items()}


def compute_metrics(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS) -> QueryMetrics:
    """Score a run of ``(docid, score)`` pairs (see the module docstring for the conventions)."""
    return metrics_from_rankings(rank_run(run), qrels, metrics)


def metrics_from_rankings(rankings: Mapping[str, Sequence[str]], qrels: Qrels,
                          metrics: Sequence[str] = DEFAULT_METRICS) -> QueryMetrics:
    """Score already-ranked docid lists (best first) against ``qrels``, one row per qrels query."""
    parsed = [parse_metric(m) for m in metrics]
    depth = max(k for _, k in parsed)
    query_ids = list(qrels)
    n = len(query_ids)
    gains = np.zeros((n, depth), dtype=np.float64)
    ideal = np.zeros((n, depth), dtype=np.float64)
    n_relevant = np.zeros(n, dtype=np.float64)
    for row, qid in enumerate(query_ids):
        judged = qrels[qid]
        ranked = rankings.get(qid, ())[:depth]
        gains[row, :len(ranked)] = [judged.get(doc, 0) for doc in ranked]
        best = sorted((g for g in judged.values() if g > 0), reverse=True)[:depth]
        ideal[row, :len(best)] = best
        n_relevant[row] = sum(1 for g in judged.values() if g >= 1)
    gains = np.maximum(gains, 0.0)
    hits = gains >= 1
    discount = 1.0 / np.log2(np.arange(2, depth + 2))
    values: dict[str, np.ndarray] = {}
    for name, (kind, k) in zip(metrics, parsed):
        if kind == "ndcg":
            dcg = gains[:, :k] @ discount[:k]
            idcg = ideal[:, :k] @ discount[:k]
            values[name] = np.divide(dcg, idcg, out=np.zeros(n), where=idcg > 0)
        elif kind == "recall":
            values[name] = np.divide(hits[:, :k].sum(axis=1), n_relevant, out=np.zeros(n), where=n_relevant > 0)
        else:  # mrr
            top = hits[:, :k]
            first = top.argmax(axis=1)
            values[name] = np.where(top.any(axis=1), 1.0 / (first + 1), 0.0)
    return QueryMetrics(query_ids=query_ids, values=values)


def same_language_at_k(rankings: Mapping[str, Sequence[str]], qrels: Qrels, query_langs: Mapping[str, str],
                       doc_langs: Mapping[str, str], k: int = 10) -> QueryMetrics:
    """Language bias: fraction of the top ``k`` that is in the query's language and not relevant.

    Meant for pooled multilingual corpora whose relevant documents are all in other languages;
    ideal value 0. Rankings should already exclude the query's own copy. Named ``same_lang@k``.
    """
    query_ids = list(qrels)
    values = np.zeros(len(query_ids))
    for row, qid in enumerate(query_ids):
        lang, judged = query_langs[qid], qrels[qid]
        top = rankings.get(qid, ())[:k]
        values[row] = sum(1 for doc in top if doc_langs[doc] == lang and judged.get(doc, 0) < 1) / k
    return QueryMetrics(query_ids=query_ids, values={f"same_lang@{k}": values})
