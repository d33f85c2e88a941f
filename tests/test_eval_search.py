"""Exact faiss search equals brute force, honours exclusions and k beyond the corpus size."""

from __future__ import annotations

import numpy as np
import pytest

from babelforge.eval.search import search_inner_product


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_matches_numpy_brute_force_across_batches():
    queries, corpus = _vectors(37, 16, 0), _vectors(200, 16, 1)
    result = search_inner_product(queries, corpus, k=10, batch_size=8)
    expected = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    np.testing.assert_array_equal(result.indices, expected)
    np.testing.assert_allclose(result.scores, np.take_along_axis(queries @ corpus.T, expected, axis=1), rtol=1e-5)


def test_excluded_rows_are_dropped_and_replaced_by_the_next_best():
    queries, corpus = _vectors(20, 8, 2), _vectors(50, 8, 3)
    scores = queries @ corpus.T
    best = np.argsort(-scores, axis=1)
    exclude = [[int(best[i, 0]), int(best[i, 3])] if i % 2 == 0 else [] for i in range(20)]
    result = search_inner_product(queries, corpus, k=5, exclude=exclude)
    for i in range(20):
        expected = [j for j in best[i] if j not in exclude[i]][:5]
        assert result.indices[i].tolist() == expected


def test_k_larger_than_corpus_pads_with_minus_one():
    queries, corpus = _vectors(3, 4, 4), _vectors(5, 4, 5)
    result = search_inner_product(queries, corpus, k=8, exclude=[[0], [], [1, 2]])
    assert result.indices.shape == (3, 8)
    assert (result.indices[0] >= 0).sum() == 4 and 0 not in result.indices[0]
    assert (result.indices[1] >= 0).sum() == 5
    assert (result.indices[2] >= 0).sum() == 3
    assert np.isneginf(result.scores[result.indices < 0]).all()
    assert sorted(result.indices[1][:5].tolist()) == [0, 1, 2, 3, 4]


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same width"):
        search_inner_product(_vectors(2, 4, 0), _vectors(3, 5, 0), k=1)
    with pytest.raises(ValueError, match="exclude has 1 entries"):
        search_inner_product(_vectors(2, 4, 0), _vectors(3, 4, 0), k=1, exclude=[[0]])
