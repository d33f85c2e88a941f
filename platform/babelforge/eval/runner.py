"""Evaluate an embedder on retrieval tasks: encode every distinct text once, then search and score.

:func:`evaluate` collects the distinct ``(prompt name, text)`` pairs of all tasks (queries are
encoded with each task's ``query_prompt``, documents with its ``corpus_prompt``), encodes each
pair once, through the Ray Data actor pool of :func:`babelforge.encoding.encode_texts` or in
process with :meth:`Embedder.encode`, then for every task and every Matryoshka dimension
truncates, searches exactly with faiss and computes the metrics. Ray appears only in the
encoding step; :func:`evaluate_embeddings` scores precomputed vectors (an
:class:`EmbeddingTable`), which is how tests inject perfect or random "models"::

    >>> from babelforge.eval import evaluate, ntrex_crosslingual_task
    >>> tasks = [ntrex_crosslingual_task("de", "en", range(200))]
    >>> report = evaluate("models/me5-small", tasks, use_ray=False)    # doctest: +SKIP
    >>> report.task("ntrex/de-en").metrics[384]["ndcg@10"]            # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from babelforge.eval.datasets import RetrievalTask
from babelforge.eval.metrics import (DEFAULT_METRICS, MAIN_METRIC, metrics_from_rankings, parse_metric,
                                     same_language_at_k)
from babelforge.eval.report import BIAS_METRIC, EvalReport, TaskResult
from babelforge.eval.search import search_inner_product
from babelforge.models import truncate_embeddings_np

log = logging.getLogger(__name__)

__all__ = ["EmbeddingTable", "TaskScore", "texts_to_encode", "default_dims", "encode_for_tasks", "score_task",
           "evaluate_embeddings", "evaluate"]

TextKey = tuple[str | None, str]  # (prompt name, text)

BIAS_K = int(BIAS_METRIC.rsplit("@", 1)[1])


@dataclass
class EmbeddingTable:
    """Vectors of distinct ``(prompt name, text)`` pairs: ``vectors[rows[key]]``."""

    vectors: np.ndarray
    rows: dict[TextKey, int]

    @classmethod
    def from_mapping(cls, mapping: Mapping[TextKey, np.ndarray]) -> "EmbeddingTable":
        keys = list(mapping)
        vectors = np.stack([np.asarray(mapping[k], dtype=np.float32) for k in keys]) if keys else np.zeros((0, 0))
        return cls(vectors=vectors.astype(np.float32, copy=False), rows={k: i for i, k in enumerate(keys)})

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def normalized(self) -> bool:
        """Whether the model emits unit vectors (then truncated vectors are re-normalised too)."""
        norms = np.linalg.norm(self.vectors, axis=1)
        return bool(len(norms)) and bool(np.allclose(norms, 1.0, atol=1e-3))

    def lookup(self, prompt: str | None, texts: Sequence[str]) -> np.ndarray:
        try:
            return self.vectors[[self.rows[(prompt, t)] for t in texts]]
        except KeyError as err:
            raise KeyError(f"no embedding for prompt {prompt!r} and text {err.args[0][1][:80]!r}") from None


@dataclass
class TaskScore:
    """Mean metrics of one task at one dimension, and the main metric per query language."""

    metrics: dict[str, float]
    by_query_lang: dict[str, float]


def texts_to_encode(tasks: Sequence[RetrievalTask]) -> list[TextKey]:
    """Distinct ``(prompt name, text)`` pairs over all tasks, in first-seen order."""
    keys: dict[TextKey, None] = {}
    for task in tasks:
        keys.update(((task.query_prompt, text), None) for text in task.queries.values())
        keys.update(((task.corpus_prompt, text), None) for text in task.corpus.values())
    return list(keys)


def default_dims(full_dim: int, smallest: int = 32) -> list[int]:
    """The full dimension, then halvings while they stay whole and at least ``smallest``."""
    dims = [full_dim]
    while dims[-1] % 2 == 0 and dims[-1] // 2 >= smallest:
        dims.append(dims[-1] // 2)
    return dims


def encode_for_tasks(model_path: str | Path, tasks: Sequence[RetrievalTask], *, use_ray: bool = True,
                     batch_size: int = 64, actors: int | None = None) -> EmbeddingTable:
    """Encode every distinct (prompt, text) of ``tasks`` once, with Ray Data or in process."""
    keys = texts_to_encode(tasks)
    if use_ray:
        from babelforge.encoding import encode_texts

        vectors = encode_texts([text for _, text in keys], str(model_path),
                               prompt_names=[prompt for prompt, _ in keys], batch_size=batch_size, actors=actors)
        return EmbeddingTable(vectors=vectors, rows={k: i for i, k in enumerate(keys)})
    from babelforge.models import Embedder

    model = Embedder.from_pretrained(model_path, device="auto")
    vectors = np.zeros((len(keys), model.hidden_size), dtype=np.float32)
    by_prompt: dict[str | None, list[int]] = {}
    for row, (prompt, _) in enumerate(keys):
        by_prompt.setdefault(prompt, []).append(row)
    for prompt, rows in by_prompt.items():
        vectors[rows] = model.encode([keys[r][1] for r in rows], prompt_name=prompt, batch_size=batch_size)
    return EmbeddingTable(vectors=vectors, rows={k: i for i, k in enumerate(keys)})


def _search_depth(metrics: Sequence[str]) -> int:
    """Hits to fetch per query for ``metrics`` (and the bias measure); checks the metric names."""
    if MAIN_METRIC not in metrics:
        raise ValueError(f"metrics must include {MAIN_METRIC} (summaries use it), got {list(metrics)}")
    return max(max(parse_metric(m)[1] for m in metrics), BIAS_K)


def _rank(task: RetrievalTask, doc_ids: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> dict[str, list[str]]:
    """Search hits -> docid lists ordered like trec_eval (score descending, ties by docid descending)."""
    docid_order = np.empty(len(doc_ids), dtype=np.int64)
    docid_order[np.argsort(doc_ids, kind="stable")] = np.arange(len(doc_ids))
    tie_key = np.where(indices >= 0, docid_order[np.maximum(indices, 0)], -1)
    order = np.lexsort((-tie_key, -scores.astype(np.float64)), axis=-1)
    ranked = np.take_along_axis(indices, order, axis=-1)
    return {qid: [doc_ids[j] for j in row if j >= 0] for qid, row in zip(task.queries, ranked)}


def score_task(task: RetrievalTask, query_vectors: np.ndarray, doc_vectors: np.ndarray,
               metrics: Sequence[str] = DEFAULT_METRICS) -> TaskScore:
    """Search ``doc_vectors`` (rows in ``task.corpus`` order) for ``query_vectors`` (``task.queries`` order)."""
    if len(query_vectors) != len(task.queries) or len(doc_vectors) != len(task.corpus):
        raise ValueError(f"task {task.name}: {len(query_vectors)} query / {len(doc_vectors)} doc vectors for "
                         f"{len(task.queries)} queries / {len(task.corpus)} docs")
    depth = _search_depth(metrics)
    doc_ids = np.asarray(task.doc_ids, dtype=object)
    doc_row = {d: i for i, d in enumerate(task.corpus)}
    exclude = [[doc_row[d] for d in task.exclude.get(qid, ())] for qid in task.queries] if task.exclude else None
    hits = search_inner_product(query_vectors, doc_vectors, depth, exclude=exclude)
    rankings = _rank(task, doc_ids, hits.scores, hits.indices)
    per_query = metrics_from_rankings(rankings, task.qrels, metrics)
    means = per_query.mean()
    if task.doc_langs is not None and len(task.corpus_langs) > 1:
        query_langs = {q: task.language_of_query(q) for q in task.queries}
        means.update(same_language_at_k(rankings, task.qrels, query_langs, task.doc_langs, BIAS_K).mean())
    by_lang = per_query.mean_by_group(MAIN_METRIC, task.query_langs) if task.query_langs else {}
    return TaskScore(metrics=means, by_query_lang=by_lang)


def evaluate_embeddings(tasks: Sequence[RetrievalTask], table: EmbeddingTable, *, dims: Sequence[int] | None = None,
                        metrics: Sequence[str] = DEFAULT_METRICS, model: str = "") -> EvalReport:
    """Score every task at every dimension from precomputed embeddings (no model, no Ray)."""
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique; repeated: {duplicates}")
    dims = sorted({int(d) for d in dims}, reverse=True) if dims else default_dims(table.dim)
    too_large = [d for d in dims if not 0 < d <= table.dim]
    if too_large:
        raise ValueError(f"dims {too_large} are outside 1..{table.dim} (the model's embedding size)")
    normalize = table.normalized
    results: list[TaskResult] = []
    for task in tasks:
        queries = table.lookup(task.query_prompt, list(task.queries.values()))
        docs = table.lookup(task.corpus_prompt, list(task.corpus.values()))
        result = TaskResult(name=task.name, setting=task.setting, query_langs=task.query_languages,
                            corpus_langs=list(task.corpus_langs), n_queries=len(task.queries),
                            n_docs=len(task.corpus), metrics={})
        for dim in dims:
            score = score_task(task, truncate_embeddings_np(queries, dim, normalize),
                               truncate_embeddings_np(docs, dim, normalize), metrics)
            result.metrics[dim] = score.metrics
            if score.by_query_lang:
                result.by_query_lang[dim] = score.by_query_lang
        log.info("%s: %s@%d = %.4f", task.describe(), MAIN_METRIC, dims[0], result.metrics[dims[0]][MAIN_METRIC])
        results.append(result)
    return EvalReport(model=model, dims=dims, metrics=list(metrics), tasks=results,
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def evaluate(model_path: str | Path, tasks: Sequence[RetrievalTask], *, dims: Sequence[int] | None = None,
             use_ray: bool = True, batch_size: int = 64, actors: int | None = None,
             metrics: Sequence[str] = DEFAULT_METRICS) -> EvalReport:
    """Encode the texts of ``tasks`` with the model at ``model_path`` and score every task.

    ``dims`` defaults to the model's full dimension and its halvings down to 32. With
    ``use_ray`` the encoding runs on the current Ray cluster (started locally if none is).
    """
    if not tasks:
        raise ValueError("no tasks to evaluate")
    _search_depth(metrics)  # reject bad metric names before the (long) encoding
    start = time.perf_counter()
    table = encode_for_tasks(model_path, tasks, use_ray=use_ray, batch_size=batch_size, actors=actors)
    encoded = time.perf_counter()
    log.info("encoded %d distinct texts in %.1f s", len(table.rows), encoded - start)
    report = evaluate_embeddings(tasks, table, dims=dims, metrics=metrics, model=str(model_path))
    done = time.perf_counter()
    report.timing = {"texts_encoded": len(table.rows), "encode_s": round(encoded - start, 3),
                     "score_s": round(done - encoded, 3), "total_s": round(done - start, 3)}
    return report
