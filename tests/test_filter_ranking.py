"""Ranking consistency on constructed vectors: the rank from a top-k search equals the brute-force
rank, filtering keeps exactly the pairs ranked within k, texts of the pair's translation group are
not competitors, and unusable pairs are named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from babelforge.errors import ConfigError
from babelforge.filter.pool import POOL_FORMAT, POOL_ROW_SCHEMA, PoolGroups, open_pool, text_keys
from babelforge.filter.ranking import BEYOND_K, pair_problem, positive_ranks, scores_of_rows
from babelforge.filter.teacher import BatchSearch, without_results
from babelforge.index import IndexConfig, VectorIndex, VectorStore


def _ranked_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pool of 12 one-hot-ish vectors; query i's positive is built to rank exactly ``wanted[i]``."""
    dim = 12
    pool = np.eye(dim, dtype=np.float32)
    wanted = np.array([1, 2, 3, 5, 6, 12])
    positives = np.array([0, 1, 2, 3, 4, 5])
    queries = np.zeros((len(wanted), dim), dtype=np.float32)
    for i, (rank, positive) in enumerate(zip(wanted, positives)):
        others = [j for j in range(dim) if j != positive]
        # rank - 1 other texts score 0.9, 0.89, ...; the positive 0.5; the rest below it.
        queries[i, others[:rank - 1]] = 0.9 - 0.01 * np.arange(rank - 1)
        queries[i, positive] = 0.5
        queries[i, others[rank - 1:]] = 0.1 - 0.001 * np.arange(dim - rank)
    return pool, queries, positives, wanted


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_filter_keeps_exactly_the_pairs_ranked_within_k(k):
    pool, queries, positives, wanted = _ranked_case()
    result = VectorIndex(pool).search(queries, k)
    direct = np.einsum("ij,ij->i", queries, pool[positives])
    scores = scores_of_rows(result.indices, result.scores, positives, direct)
    ranks = positive_ranks(result.indices, result.scores, positives, scores, k)
    assert ranks.tolist() == [r if r <= k else BEYOND_K for r in wanted]
    np.testing.assert_allclose(scores, 0.5)


def test_ranks_match_brute_force_on_random_vectors():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    positives = rng.integers(0, 500, 200)
    all_scores = queries @ pool.T
    positive_scores = all_scores[np.arange(200), positives]
    brute = 1 + (all_scores > positive_scores[:, None]).sum(axis=1)
    result = VectorIndex(pool).search(queries, 50)
    scores = scores_of_rows(result.indices, result.scores, positives, positive_scores)
    ranks = positive_ranks(result.indices, result.scores, positives, scores, 50)
    assert ranks.tolist() == np.where(brute <= 50, brute, BEYOND_K).tolist()
    assert (ranks > 0).sum() > 10 and (ranks == 0).sum() > 10   # both outcomes occur


def test_ties_are_resolved_in_favour_of_the_positive():
    rows = np.array([[3, 9, 4]])
    scores = np.array([[0.7, 0.7, 0.7]], dtype=np.float32)
    # the positive (row 4) ties with the two rows returned before it; also when it was not returned
    assert positive_ranks(rows, scores, np.array([4]), np.array([0.7]), k=3).tolist() == [1]
    assert positive_ranks(rows, scores, np.array([8]), np.array([0.7]), k=3).tolist() == [1]
    assert positive_ranks(rows, scores, np.array([8]), np.array([0.69]), k=3).tolist() == [BEYOND_K]


def test_search_score_of_a_returned_positive_is_used():
    rows = np.array([[5, 6], [7, 8]])
    scores = np.array([[0.9, 0.8], [0.6, 0.5]], dtype=np.float32)
    assert scores_of_rows(rows, scores, np.array([6, 1]), np.array([0.1, 0.2])).tolist() == pytest.approx([0.8, 0.2])


def test_the_query_own_pool_row_is_removed_from_results():
    rows = np.array([[4, 1, 2, 3], [1, 2, 3, 5]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    kept_rows, kept_scores = without_results(rows == np.array([[4], [-1]]), 3, rows, scores)
    assert kept_rows.tolist() == [[1, 2, 3], [1, 2, 3]]
    np.testing.assert_allclose(kept_scores, [[0.8, 0.7, 0.6], [0.5, 0.4, 0.3]])


def _pool_store(tmp_path, groups: list[list[str]], shard_rows: int) -> VectorStore:
    store = VectorStore(str(tmp_path / "pool"))
    for number, start in enumerate(range(0, len(groups), shard_rows)):
        part = groups[start:start + shard_rows]
        texts = [f"text {start + i}" for i in range(len(part))]
        rows = pa.table({"text_key": text_keys(texts), "text": texts, "groups": part}, schema=POOL_ROW_SCHEMA)
        store.write_shard(f"pool-{number:05d}", np.eye(len(groups), dtype=np.float32)[start:start + len(part)], rows)
    return store


def test_pool_groups_give_the_global_rows_of_a_group(tmp_path):
    groups = [["g1"], [], ["g1", "g2"], ["g2"], ["g1"], []]     # a text may be in several groups
    members = PoolGroups(_pool_store(tmp_path, groups, shard_rows=4)).members(["g1", None, "g2", "unknown"])
    assert [m.tolist() for m in members] == [[0, 2, 4], [], [2, 3], []]


def test_a_pool_without_groups_is_refused(tmp_path):
    store = _pool_store(tmp_path, [[]], shard_rows=1)
    store.write_metadata({"complete": True})                 # written before pools had a format
    with pytest.raises(ConfigError, match="without translation groups"):
        open_pool(store.uri)
    store.write_metadata({"complete": True, "format": POOL_FORMAT})
    assert open_pool(store.uri)[1]["format"] == POOL_FORMAT


def test_a_same_group_text_outranking_the_positive_is_not_counted(tmp_path):
    """Pool: 0 = the positive (German), 1 = the French translation of the query, 2 = the query's own
    English text (another pair's positive), 3..7 = unrelated. Scores: query 0.95, translation 0.9,
    positive 0.8, one unrelated text 0.85, the rest lower."""
    groups = [["ntrex:7"], ["ntrex:7"], ["ntrex:7"], [], [], [], ["ntrex:3"], []]
    store = _pool_store(tmp_path, groups, shard_rows=3)
    query = np.array([[0.8, 0.9, 0.95, 0.85, 0.1, 0.2, 0.3, 0.05]], dtype=np.float32)
    pool = np.eye(8, dtype=np.float32)
    k = 3
    search = BatchSearch(pa.table({"id": ["p"]}), [None], [None])
    search.positive_rows = np.array([0])
    search.group_rows = PoolGroups(store).members(["ntrex:7"])
    result = VectorIndex(pool).search(query, k + 1 + len(search.group_rows[0]))
    same_group = search.in_group(result.indices)
    assert result.indices[0, :4].tolist() == [2, 1, 3, 0]
    assert same_group.tolist() == [[True, True, False, False, False, False, False]]     # never the positive
    excluded = (result.indices == 2) | same_group                                      # and the query's own row
    rows, scores = without_results(excluded, k, result.indices, result.scores)
    assert rows.tolist() == [[3, 0, 6]]
    positive_score = scores_of_rows(rows, scores, np.array([0]), np.array([0.8]))
    assert positive_ranks(rows, scores, np.array([0]), positive_score, k).tolist() == [2]   # only row 3 beats it
    plain_rows, plain_scores = without_results(result.indices == 2, k, result.indices, result.scores)
    assert positive_ranks(plain_rows, plain_scores, np.array([0]), positive_score, k).tolist() == [3]


@pytest.mark.parametrize("query, positive, reason", [
    (None, "p", "missing_field"), ("q", None, "missing_field"), ("  ", "p", "empty_text"),
    ("q", "", "empty_text"), ("same", " same ", "query_equals_positive")])
def test_unusable_pairs_are_named(query, positive, reason):
    assert pair_problem(query, positive)[0] == reason


def test_usable_pair_has_no_problem():
    assert pair_problem("Wie spät ist es?", "What time is it?") is None


def test_index_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="nprobes"):
        IndexConfig.model_validate({"nprobes": 3})
