"""Vector indexes: exact search equals brute force, IVF with nprobe = nlist is exact, sharded search
(resident or one shard at a time from disk) equals unsharded exact search, stores resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from babelforge.eval.search import SearchResult, search_inner_product
from babelforge.index import IndexConfig, ShardedIndex, VectorIndex, VectorStore, ivf_cells, merge_top_k


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _store(tmp_path, vectors: np.ndarray, shard_rows: int) -> VectorStore:
    store = VectorStore(str(tmp_path / "store"))
    for number, start in enumerate(range(0, len(vectors), shard_rows)):
        chunk = vectors[start:start + shard_rows]
        store.write_shard(f"part-{number:03d}", chunk, pa.table({"row": np.arange(start, start + len(chunk))}))
    return store


def test_flat_index_matches_brute_force_and_eval_search():
    corpus, queries = _unit_vectors(300, 16, 0), _unit_vectors(40, 16, 1)
    result = VectorIndex(corpus, IndexConfig(kind="flat", query_batch=7)).search(queries, k=10)
    expected = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    np.testing.assert_array_equal(result.indices, expected)
    np.testing.assert_array_equal(result.indices, search_inner_product(queries, corpus, k=10).indices)


def test_ivf_with_all_cells_probed_is_exact():
    corpus, queries = _unit_vectors(2000, 16, 2), _unit_vectors(30, 16, 3)
    nlist = 16
    assert ivf_cells(len(corpus), nlist) == nlist
    ivf = VectorIndex(corpus, IndexConfig(kind="ivf", nlist=nlist, nprobe=nlist, train_sample=1000))
    flat = VectorIndex(corpus, IndexConfig(kind="flat"))
    exact, approx = flat.search(queries, 20), ivf.search(queries, 20)
    np.testing.assert_array_equal(approx.indices, exact.indices)
    np.testing.assert_allclose(approx.scores, exact.scores, rtol=1e-5)


def test_ivf_cells_are_capped_by_training_points():
    assert ivf_cells(100, 64) == 2          # at least 39 training vectors per cell
    assert ivf_cells(100_000, None) == 1265   # 4 * sqrt(rows)
    assert ivf_cells(10_000, None) == 256     # 4 * sqrt(rows) = 400 cells would get fewer than 39 vectors each
    assert ivf_cells(5, None) == 1


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_sharded_search_equals_unsharded_exact_search(tmp_path, resident, kind):
    corpus, queries = _unit_vectors(1000, 8, 4), _unit_vectors(25, 8, 5)
    store = _store(tmp_path, corpus, shard_rows=300)   # 4 shards, the last one short
    config = IndexConfig(kind=kind, nlist=4, nprobe=4, resident=resident)
    sharded = ShardedIndex(store, config).search(queries, k=15)
    exact = VectorIndex(corpus, IndexConfig(kind="flat")).search(queries, k=15)
    np.testing.assert_array_equal(sharded.indices, exact.indices)
    np.testing.assert_allclose(sharded.scores, exact.scores, rtol=1e-5)
    if kind == "ivf":  # trained once per shard and saved in the store
        assert len(list((tmp_path / "store" / "index").iterdir())) == 4


def test_sharded_index_returns_stored_vectors_by_global_row(tmp_path):
    corpus = _unit_vectors(50, 4, 6)
    index = ShardedIndex(_store(tmp_path, corpus, shard_rows=20), IndexConfig(resident=False))
    rows = np.array([[0, 19], [20, 49]])
    np.testing.assert_array_equal(index.vectors(rows), corpus[rows])
    with pytest.raises(IndexError):
        index.vectors(np.array([50]))


def test_k_beyond_rows_is_padded():
    corpus = _unit_vectors(3, 4, 7)
    result = VectorIndex(corpus).search(corpus[:1], k=5)
    assert result.indices[0, 3:].tolist() == [-1, -1] and np.isneginf(result.scores[0, 3:]).all()
    assert sorted(result.indices[0, :3].tolist()) == [0, 1, 2]


def test_merge_orders_ties_by_row_and_pads():
    a = SearchResult(np.array([[0.5, 0.2]], np.float32), np.array([[7, 3]]))
    b = SearchResult(np.array([[0.5, -np.inf]], np.float32), np.array([[2, -1]]))
    merged = merge_top_k([a, b], k=5)
    assert merged.indices.tolist() == [[2, 7, 3, -1, -1]]
    assert merged.scores[0, :3].tolist() == pytest.approx([0.5, 0.5, 0.2])


def test_store_lists_only_committed_shards_with_offsets(tmp_path):
    store = _store(tmp_path, _unit_vectors(30, 4, 8), shard_rows=10)
    assert [(s.name, s.rows, s.offset) for s in store.shards()] == [("part-000", 10, 0), ("part-001", 10, 10),
                                                                     ("part-002", 10, 20)]
    (tmp_path / "store" / "_done" / "part-001.json").unlink()   # as if the writer died before the marker
    assert not store.is_done("part-001")
    assert [s.offset for s in VectorStore(str(tmp_path / "store")).shards()] == [0, 10]
    with pytest.raises(ValueError, match="vectors but"):
        store.write_shard("bad", np.zeros((2, 4), np.float32), pa.table({"row": [1]}))
