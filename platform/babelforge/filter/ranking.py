"""Ranking consistency, the pure part: where does a pair's positive rank among the teacher's results?

The *rank* of a positive is 1 + the number of other pool texts whose score for the query is
strictly higher than the positive's (ties are resolved in the positive's favour; the pool holds
each text once, so the positive has no exact copy competing with it). The pool copy of the query
text itself and the other texts of the pair's translation group (alternative correct answers,
see :mod:`babelforge.schema`) are not competitors: the caller removes them from the results
first (:func:`babelforge.filter.teacher.without_results`). A top-``k`` search decides
every rank up to ``k`` exactly: if fewer than ``k`` returned texts beat the positive, some returned
text scores no higher than the positive, so no text outside the results beats it either.

The positive's score is the one the search returned for it, or (when it was not returned) its
inner product with the query computed directly::

    >>> import numpy as np
    >>> rows = np.array([[7, 3, 5]])            # search results for one query, best first
    >>> scores = np.array([[0.9, 0.8, 0.8]], dtype=np.float32)
    >>> positive_ranks(rows, scores, positive_rows=np.array([5]), positive_scores=np.array([0.8]), k=3)
    array([2], dtype=int32)
    >>> positive_ranks(rows, scores, positive_rows=np.array([1]), positive_scores=np.array([0.85]), k=3)
    array([2], dtype=int32)
    >>> positive_ranks(rows, scores, positive_rows=np.array([1]), positive_scores=np.array([0.1]), k=3)
    array([0], dtype=int32)

``0`` means "beyond ``k``". :func:`pair_problem` names what makes a pair unusable before any
ranking (missing or empty text, query equal to positive).
"""

from __future__ import annotations

import numpy as np

__all__ = ["positive_ranks", "scores_of_rows", "pair_problem", "BEYOND_K"]

BEYOND_K = 0


def scores_of_rows(result_rows: np.ndarray, result_scores: np.ndarray, rows: np.ndarray,
                   direct_scores: np.ndarray) -> np.ndarray:
    """Per query, the search score of ``rows[i]`` if it was returned, else ``direct_scores[i]``.

    Using the search's own score when there is one keeps the comparison with the other results
    free of rounding differences between faiss and a separately computed inner product.
    """
    hit = result_rows == rows[:, None]
    found = hit.any(axis=1)
    searched = np.where(found, result_scores[np.arange(len(rows)), hit.argmax(axis=1)], 0.0)
    return np.where(found, searched, direct_scores).astype(np.float32)


def positive_ranks(result_rows: np.ndarray, result_scores: np.ndarray, positive_rows: np.ndarray,
                   positive_scores: np.ndarray, k: int) -> np.ndarray:
    """1-based rank of each query's positive if it is at most ``k``, else :data:`BEYOND_K`.

    ``result_rows`` / ``result_scores`` (``[queries, >= k]``) are the search results best first,
    padded with row ``-1``; only the first ``k`` columns are used.
    """
    rows, scores = result_rows[:, :k], result_scores[:, :k]
    others = (rows >= 0) & (rows != positive_rows[:, None])
    higher = (others & (scores > np.asarray(positive_scores, dtype=np.float32)[:, None])).sum(axis=1)
    return np.where(higher < k, higher + 1, BEYOND_K).astype(np.int32)


def pair_problem(query: str | None, positive: str | None) -> tuple[str, str] | None:
    """(reason code, detail) when a pair cannot be ranked, else None."""
    for name, value in (("query", query), ("positive", positive)):
        if value is None:
            return "missing_field", f"field {name!r} is missing"
        if not value.strip():
            return "empty_text", f"field {name!r} is empty"
    if query.strip() == positive.strip():
        return "query_equals_positive", "the query and the positive are the same text"
    return None
