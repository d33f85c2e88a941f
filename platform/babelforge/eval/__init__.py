"""Retrieval evaluation: tasks, metrics, exact search, the encode-once runner and reports.

Everything but the encoding step of :func:`evaluate` is plain NumPy/faiss (no Ray), so metrics
and search run anywhere::

    >>> from babelforge.eval import evaluate, ntrex_multilingual_task, split_ntrex_lines, write_report
    >>> lines = split_ntrex_lines().heldout_lines
    >>> task = ntrex_multilingual_task(["en", "de", "zh"], lines, max_queries=50)
    >>> report = evaluate("models/me5-small", [task])          # doctest: +SKIP
    >>> write_report(report, "outputs/eval")                   # doctest: +SKIP

Modules: :mod:`.datasets` (RetrievalTask, BEIR loader), :mod:`.bitext` (NTREX / Tatoeba tasks),
:mod:`.metrics`, :mod:`.search`, :mod:`.runner`, :mod:`.report`, :mod:`.config`, :mod:`.cli`.
"""

from babelforge.eval.bitext import (NtrexSplit, ntrex_crosslingual_task, ntrex_monolingual_task,
                                    ntrex_multilingual_task, select_ntrex_lines, split_ntrex_lines, tatoeba_task)
from babelforge.eval.datasets import SETTINGS, LoadReport, RetrievalTask, load_beir
from babelforge.eval.metrics import DEFAULT_METRICS, MAIN_METRIC, QueryMetrics, compute_metrics, same_language_at_k
from babelforge.eval.report import EvalReport, TaskResult, compare_reports, load_report, report_markdown, write_report
from babelforge.eval.runner import EmbeddingTable, default_dims, evaluate, evaluate_embeddings, score_task
from babelforge.eval.search import SearchResult, search_inner_product

__all__ = ["RetrievalTask", "LoadReport", "SETTINGS", "load_beir", "NtrexSplit", "split_ntrex_lines",
           "select_ntrex_lines", "ntrex_crosslingual_task", "ntrex_monolingual_task", "ntrex_multilingual_task",
           "tatoeba_task", "DEFAULT_METRICS", "MAIN_METRIC", "QueryMetrics", "compute_metrics", "same_language_at_k",
           "SearchResult", "search_inner_product", "EmbeddingTable", "default_dims", "evaluate",
           "evaluate_embeddings", "score_task", "EvalReport", "TaskResult", "write_report", "load_report",
           "report_markdown", "compare_reports"]
