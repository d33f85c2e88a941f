"""filter -> mine on Ray with the tiny teacher over multi-parallel pairs (NTREX lines for en/de/fr/ru,
pairs en-de, en-fr, en-ru: the positives of one line translate each other and share its group):
filtering keeps exactly the pairs whose positive the teacher ranks within k among the texts that
are neither the query nor another text of its group (checked against brute force over in-process
embeddings), the pool records each text's groups, mining never returns the positive, a text of
the pair's group nor a candidate over the guard, nothing is lost (rows in = kept + quarantined),
and a rerun resumes from committed shards without recomputing them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.data.pairs import PAIRS_INPUT_SCHEMA
from babelforge.data.shards import ShardWriter
from babelforge.eval.bitext import read_ntrex
from babelforge.filter.config import FilterConfig
from babelforge.filter.pool import PoolLookup
from babelforge.filter.stage import FILTERED_PAIR_SCHEMA, run_filter
from babelforge.index import VectorStore
from babelforge.mine.config import MineConfig
from babelforge.mine.sampling import normalize_for_match
from babelforge.mine.stage import run_mine
from babelforge.models import Embedder
from babelforge.schema import TRAINING_SCHEMA

K = 5
RATIO = 0.999
NUM_NEGATIVES = 3
MAX_RANK = 15
INVALID = {"bad-empty": "empty_text", "bad-missing": "missing_field", "bad-same": "query_equals_positive"}


class Interrupted(Exception):
    pass


def _write_pairs(path) -> list[dict]:
    """12 NTREX lines x (en-de, en-fr, en-ru) in group ``ntrex:<line>``; some German pairs carry an
    unrelated hard negative (one of them the English query of line 3, which joins the pool with
    group ``ntrex:3``), one French pair a translation of its own line (which must not be used)."""
    english, german, french, russian = (read_ntrex(lang) for lang in ("en", "de", "fr", "ru"))
    rows = []
    for lang, texts in (("de", german), ("fr", french), ("ru", russian)):
        for i in range(12):
            hard_negative = german[i + 100] if lang == "de" and i % 4 == 0 else None
            if lang == "de" and i == 2:
                hard_negative = english[3]
            if lang == "fr" and i == 1:
                hard_negative = russian[i]
            rows.append({"id": f"p-{lang}-{i:02d}", "query": english[i], "positive": texts[i],
                         "hard_negative": hard_negative, "query_lang": "en", "positive_lang": lang,
                         "task": "bitext", "instruction": None, "source": "test", "group": f"ntrex:{i}"})
    rows += [{"id": "bad-empty", "query": "  ", "positive": german[50]}, {"id": "bad-missing", "query": english[51],
              "positive": None}, {"id": "bad-same", "query": german[52], "positive": german[52]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_INPUT_SCHEMA), path)
    return rows


@pytest.fixture(scope="module")
def filtered(ray_local, tiny_encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("filter-stage")
    rows = _write_pairs(root / "pairs.parquet")
    cfg = FilterConfig.model_validate({
        "output_dir": str(root / "filter"), "inputs": [{"pairs": str(root / "pairs.parquet")}],
        "teacher": {"model": str(tiny_encoder_dir), "rows_per_call": 8}, "k": K, "rows_per_shard": 13})

    committed_first: list[str] = []

    def crash_after_first_shard(shard, stats):
        committed_first.append(shard)
        raise Interrupted(shard)

    with pytest.raises(Interrupted):
        run_filter(cfg, on_shard_committed=crash_after_first_shard)
    out = root / "filter"
    marker_mtime = (out / "_done" / f"{committed_first[0]}.json").stat().st_mtime_ns
    pool_mtime = {p.name: p.stat().st_mtime_ns for p in (out / "_pool" / "shards").iterdir()}
    committed_on_resume: list[str] = []
    summary = run_filter(cfg, on_shard_committed=lambda shard, stats: committed_on_resume.append(shard))
    return SimpleNamespace(cfg=cfg, rows=rows, summary=summary, out=out, first=committed_first[0],
                           marker_mtime=marker_mtime, pool_mtime=pool_mtime, resumed=committed_on_resume)


def _group_texts(rows: list[dict]) -> dict[str, set[str]]:
    """group -> the queries and positives of its pairs."""
    texts: dict[str, set[str]] = {}
    for row in rows:
        if row.get("group"):
            texts.setdefault(row["group"], set()).update((row["query"], row["positive"]))
    return texts


def _brute_force_ranks(cfg: FilterConfig, rows: list[dict]) -> dict[str, tuple[int, float, float, int]]:
    """pair id -> (rank of the positive, its score, margin to the k-th competitor, number of texts of
    its group scoring above it), from embeddings computed here, in-process, over the texts of the
    stored pool."""
    model = Embedder.from_pretrained(cfg.teacher.model)
    store = VectorStore(cfg.pool_dir())
    texts = [t for s in store.shards() for t in store.read_rows(s.name, ["text"]).column("text").to_pylist()]
    stored = np.concatenate([store.load_vectors(s.name) for s in store.shards()])
    pool = model.encode(texts, prompt_name="passage")
    np.testing.assert_allclose(pool, stored, atol=1e-4)        # the pool holds the teacher's embeddings
    row_of = {t: i for i, t in enumerate(texts)}
    valid = [r for r in rows if r["id"] not in INVALID]
    queries = model.encode([r["query"] for r in valid], prompt_name="query")
    group_texts = _group_texts(rows)
    ranks = {}
    for row, query in zip(valid, queries):
        scores = pool @ query
        positive = row_of[row["positive"]]
        same_group = group_texts[row["group"]] - {row["positive"]}
        competitors = np.array([s for i, s in enumerate(scores)
                                if i != positive and texts[i] != row["query"] and texts[i] not in same_group])
        rank = 1 + int((competitors > scores[positive]).sum())
        kth = np.sort(competitors)[::-1][K - 1]
        group_above = sum(scores[row_of[t]] > scores[positive] for t in same_group if t in row_of and t != row["query"])
        ranks[row["id"]] = (rank, float(scores[positive]), abs(float(scores[positive]) - kth), group_above)
    return ranks


def _read(paths) -> list[dict]:
    return [r for p in paths for r in pq.read_table(p).to_pylist()]


def test_filter_keeps_exactly_the_pairs_ranked_within_k(filtered):
    kept = {r["id"]: r for r in _read(sorted((filtered.out / "data").glob("*.parquet")))}
    ranks = _brute_force_ranks(filtered.cfg, filtered.rows)
    decided = {i: v for i, v in ranks.items() if v[2] > 1e-4}   # leave out float near-ties at the k-th place
    assert len(decided) >= 30
    expected = {i for i, (rank, _, _, _) in decided.items() if rank <= K}
    assert 0 < len(expected) < len(decided)                     # the case has both outcomes
    # translations outrank the positive in some kept pairs: counting them would give other ranks
    assert any(decided[i][3] for i in expected)
    assert {i for i in kept if i in decided} == expected
    for pair_id in expected:
        assert kept[pair_id]["positive_rank"] == decided[pair_id][0]
        assert kept[pair_id]["positive_score"] == pytest.approx(decided[pair_id][1], abs=1e-4)
    assert pq.read_schema(next((filtered.out / "data").glob("*.parquet"))) == FILTERED_PAIR_SCHEMA


def test_filter_quarantines_the_rest_with_reasons_and_loses_nothing(filtered):
    summary = filtered.summary
    assert summary.rows_in == len(filtered.rows) == summary.kept + sum(summary.quarantined.values())
    writer = ShardWriter(filtered.cfg.output_dir, stage="filter", schema=FILTERED_PAIR_SCHEMA)
    for shard in writer.completed():
        stats = writer.stats(shard)
        assert stats.rows_in == stats.kept + stats.rejected
    quarantined = {json.loads(q["record"])["id"]: q for q in writer.iter_quarantine()}
    for pair_id, reason in INVALID.items():
        assert quarantined[pair_id]["reason"] == reason
    ranked_out = [q for q in quarantined.values() if q["reason"] == "positive_not_in_top_k"]
    assert ranked_out and all(f"> {K}" in q["detail"] for q in ranked_out)
    kept_ids = {r["id"] for r in _read((filtered.out / "data").glob("*.parquet"))}
    assert kept_ids.isdisjoint(quarantined) and len(kept_ids) + len(quarantined) == len(filtered.rows)


def test_pool_records_the_groups_of_every_text(filtered):
    store = VectorStore(filtered.cfg.pool_dir())
    recorded = {r["text"]: r["groups"] for s in store.shards() for r in store.read_rows(s.name).to_pylist()}
    expected: dict[str, set[str]] = {}
    for group, texts in _group_texts(filtered.rows).items():
        for text in texts:
            expected.setdefault(text, set()).add(group)
    for text, groups in recorded.items():                   # hard negatives and invalid pairs' texts: none
        assert groups == sorted(expected.get(text, ())), text
    english, russian = read_ntrex("en"), read_ntrex("ru")
    assert recorded[russian[1]] == ["ntrex:1"]              # also the French pair's hard negative: no extra group
    assert recorded[english[3]] == ["ntrex:3"]              # in the pool as a hard negative, grouped as a query
    assert sum(bool(g) for g in recorded.values()) == 37    # the 36 positives and that query


def test_filter_rerun_resumes_from_committed_shards(filtered):
    assert filtered.summary.shards == 3 and filtered.summary.resumed_shards == 1
    assert filtered.first not in filtered.resumed and len(filtered.resumed) == 2
    assert (filtered.out / "_done" / f"{filtered.first}.json").stat().st_mtime_ns == filtered.marker_mtime
    assert {p.name: p.stat().st_mtime_ns for p in (filtered.out / "_pool" / "shards").iterdir()} == filtered.pool_mtime


@pytest.fixture(scope="module")
def mined(filtered, tmp_path_factory):
    cfg = MineConfig.model_validate({
        "input": filtered.cfg.output_dir, "output_dir": str(tmp_path_factory.mktemp("mine-stage") / "mine"),
        "negatives": {"num_negatives": NUM_NEGATIVES, "min_rank": 1, "max_rank": MAX_RANK, "ratio": RATIO},
        "on_shortage": "keep"})
    summary = run_mine(cfg)
    rerun = run_mine(cfg)
    rows = _read(ShardWriter(cfg.output_dir, stage="mine", schema=TRAINING_SCHEMA).data_files())
    return SimpleNamespace(cfg=cfg, summary=summary, rerun=rerun, rows=rows)


def test_mine_never_returns_a_text_of_the_pairs_group(filtered, mined):
    group_texts = _group_texts(filtered.rows)
    for row in mined.rows:
        assert row["group"] == next(r["group"] for r in filtered.rows if r["id"] == row["id"])
        assert not set(row["negatives"]) & group_texts[row["group"]]
    assert mined.summary.extra["dropped_same_group"] > 0     # translations did reach the rank window


def test_mine_never_returns_the_positive_nor_a_candidate_over_the_ratio(filtered, mined):
    model = Embedder.from_pretrained(filtered.cfg.teacher.model)
    store = VectorStore(filtered.cfg.pool_dir())
    vectors = np.concatenate([store.load_vectors(s.name) for s in store.shards()])
    lookup = PoolLookup(store)
    queries = model.encode([r["query"] for r in mined.rows], prompt_name="query")
    assert mined.rows and sum(len(r["negatives"]) for r in mined.rows) > 0
    for row, query in zip(mined.rows, queries):
        negatives = row["negatives"]
        assert len(negatives) <= NUM_NEGATIVES and len(set(negatives)) == len(negatives)
        assert all(normalize_for_match(n) != normalize_for_match(row["positive"]) for n in negatives)
        pool_scores = vectors @ query
        negative_rows = lookup.rows_of(negatives)
        assert (negative_rows >= 0).all()
        assert (pool_scores[negative_rows] <= RATIO * row["positive_score"] + 1e-4).all()
        depth_score = np.sort(pool_scores)[::-1][MAX_RANK]   # rank window: at most MAX_RANK (+ the query's own row)
        synthetic = next(r["hard_negative"] for r in filtered.rows if r["id"] == row["id"])
        if synthetic and negatives and negatives[0] == synthetic:
            negative_rows = negative_rows[1:]                 # the source's own hard negative has no rank window
        assert (pool_scores[negative_rows] >= depth_score - 1e-4).all()


def test_mine_keeps_the_synthetic_hard_negative_first_when_it_passes_the_guard(filtered, mined):
    used = mined.summary.extra["hard_negatives_used"]
    firsts = {r["id"]: r["negatives"][:1] for r in mined.rows}
    synthetic = {r["id"]: r["hard_negative"] for r in filtered.rows if r.get("hard_negative")}
    assert used == sum(firsts.get(i) == [text] for i, text in synthetic.items())


def test_mine_counts_and_resume(filtered, mined):
    summary = mined.summary
    assert summary.rows_in == filtered.summary.kept == summary.kept + sum(summary.quarantined.values())
    assert summary.extra["negatives"] == sum(len(r["negatives"]) for r in mined.rows)
    assert mined.rerun.extra["shards_this_run"] == 0 and mined.rerun.resumed_shards == mined.rerun.shards
    assert mined.rerun.kept == summary.kept
    assert pq.read_schema(ShardWriter(mined.cfg.output_dir, stage="mine", schema=TRAINING_SCHEMA)
                          .data_files()[0]) == TRAINING_SCHEMA
