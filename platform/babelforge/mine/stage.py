"""The ``mine`` stage: hard negatives for every filtered pair, from the teacher's ranking of the pool.

:func:`run_mine` streams the committed shards of a filter output through :class:`MineActor`
actors (teacher + the same pool index, loaded once per actor; one actor per GPU) into a
:class:`~babelforge.data.shards.ShardWriter` with stage ``mine``. Per pair the actor searches the
pool for the top ``negatives.max_rank`` texts and :func:`babelforge.mine.sampling.select_negatives`
chooses the negatives (rank window, positive exclusion by pool row, by translation group and by
normalised text, near-duplicate check, false-negative guard ``score <= ratio * positive_score``,
the source's hard negative first). Texts sharing the pair's translation group
(:mod:`babelforge.schema`, e.g. the same NTREX line in a third language) are never negatives:
neither from the search results, nor as the source's hard negative, nor as ``pad_random``
padding. Rerunning skips committed shards; a filter run that committed more shards since is
picked up by the next mine run.

Output ``<output_dir>/data/<shard>.parquet``: ``TRAINING_SCHEMA`` (query, positive, negatives,
languages, task, instruction, source, translation ``group``, ``positive_rank`` from filtering,
``positive_score`` from this search). Quarantine reasons: ``too_few_negatives`` (with
``on_shortage: drop`` or ``pad_random``), plus the pair checks of filtering. Per-shard statistics:
``negatives``, ``hard_negatives_used``, ``hard_negatives_not_in_pool``, ``padded``, ``short_kept``
and ``dropped_<reason>`` for each rule that removed candidates (e.g. ``dropped_same_group``).

    >>> cfg = load_config("jobs/configs/mine.yaml", MineConfig)               # doctest: +SKIP
    >>> print(format_report(run_mine(cfg)))                                     # doctest: +SKIP
    [mine] shards=3 rows in=2861 kept=2861 quarantined=0 (none)
    [mine] 20027 negatives (7.00 per kept pair; 0 synthetic hard negatives); candidates dropped: over_ratio=1840, ...
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from babelforge.data.shards import ShardWriter, StageSummary, resolve_filesystem
from babelforge.errors import ConfigError
from babelforge.filter.config import TeacherConfig
from babelforge.filter.pool import open_pool
from babelforge.filter.ranking import BEYOND_K, positive_ranks
from babelforge.filter.stage import FILTERED_PAIR_SCHEMA, check_fingerprint
from babelforge.filter.stage import STAGE as FILTER_STAGE
from babelforge.filter.teacher import (STAT_PREFIX, BatchSearch, PoolSearchActor, ShardHook, search_pipeline,
                                      stream_into_shards)
from babelforge.mine.config import MineConfig
from babelforge.mine.sampling import (DROP_REASONS, Candidates, HardNegative, NegativeSettings, Positive, pair_rng,
                                      select_negatives)
from babelforge.schema import TRAINING_SCHEMA

log = logging.getLogger(__name__)

__all__ = ["run_mine", "format_report", "MineActor", "STAGE"]

STAGE = "mine"
_COUNTS = ("negatives", "hard_negatives_used", "hard_negatives_not_in_pool", "padded", "short_kept",
           *(f"dropped_{reason}" for reason in DROP_REASONS))


class MineActor(PoolSearchActor):
    """Chooses each pair's negatives from the teacher's top ``max_rank`` pool texts."""

    def __init__(self, *, negatives: dict[str, Any], on_shortage: str, pad_candidates: int, **kwargs: Any) -> None:
        super().__init__(load_texts=True, **kwargs)
        self.settings = NegativeSettings(**negatives)
        self.search_depth = self.settings.max_rank
        self.on_shortage = on_shortage
        self.pad_candidates = pad_candidates

    def _scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Inner products of each query with the pool vectors of its ``rows`` (``-1`` rows score ``-inf``).

        Computed for 64 queries at a time, so at most ``64 * rows.shape[1]`` pool vectors are gathered at once.
        """
        scores = np.empty(rows.shape, dtype=np.float32)
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            vectors = self.index.vectors(np.where(chunk < 0, 0, chunk))
            scores[start:start + 64] = np.einsum("id,i...d->i...", queries[start:start + 64], vectors)
        return np.where(rows < 0, -np.inf, scores).astype(np.float32)

    def _hard_negatives(self, search: BatchSearch) -> list[HardNegative | None]:
        texts = search.table.column("hard_negative").to_pylist()
        texts = [texts[i] for i in search.valid.tolist()]
        rows = self.lookup.rows_of(texts)
        scores = self._scores(search.queries, rows)
        similarity = self._scores(self.index.vectors(search.positive_rows), rows)
        same_group = search.in_group(rows[:, None])[:, 0]
        return [HardNegative(t, float(scores[j]), float(similarity[j]), bool(same_group[j])) if rows[j] >= 0 else None
                for j, t in enumerate(texts)]

    def _fallback(self, search: BatchSearch, ids: list[str]) -> list[Candidates]:
        draws = np.stack([pair_rng(self.settings.seed, f"pad:{pair_id}").integers(0, self.index.rows,
                                                                                  self.pad_candidates)
                          for pair_id in ids])
        return self._candidates(search, draws, self._scores(search.queries, draws), search.in_group(draws))

    def _candidates(self, search: BatchSearch, rows: np.ndarray, scores: np.ndarray,
                    same_group: np.ndarray) -> list[Candidates]:
        texts = self.texts.texts_of(rows)
        width = rows.shape[1]
        similarity = None
        if self.settings.near_duplicate_score is not None:
            similarity = self._scores(self.index.vectors(search.positive_rows), rows)
        return [Candidates(rows[j], scores[j], texts[j * width:(j + 1) * width],
                           None if similarity is None else similarity[j], same_group[j]) for j in range(len(rows))]

    def finish(self, search: BatchSearch) -> pa.Table:
        table, n = search.table, search.table.num_rows
        negatives: list[list[str] | None] = [None] * n
        ranks: list[int | None] = (table.column("positive_rank").to_pylist() if "positive_rank" in table.column_names
                                   else [None] * n)
        scores: list[float | None] = [None] * n
        counts = {name: np.zeros(n, dtype=np.int64) for name in _COUNTS}
        if len(search.valid):
            valid = search.valid.tolist()
            ids, queries = table.column("id").to_pylist(), table.column("query").to_pylist()
            positives = table.column("positive").to_pylist()
            candidates = self._candidates(search, search.rows, search.scores, search.same_group)
            hard_negatives = self._hard_negatives(search)
            fallback = self._fallback(search, [ids[i] for i in valid]) if self.on_shortage == "pad_random" else None
            # the filter's rank rule: the pair's other group texts are not competitors; a rank is
            # decided only if some remaining result does not beat the positive
            competitors = np.where(search.same_group, -1, search.rows)
            searched_ranks = positive_ranks(competitors, search.scores, search.positive_rows, search.positive_scores,
                                            self.search_depth)
            searched_ranks[searched_ranks > (competitors >= 0).sum(axis=1)] = BEYOND_K
            has_hard_negative = table.column("hard_negative").is_valid().to_pylist()
            for j, i in enumerate(valid):
                positive = Positive(int(search.positive_rows[j]), float(search.positive_scores[j]), positives[i])
                choice = select_negatives(candidates[j], positive, self.settings, query=queries[i], pair_id=ids[i],
                                          hard_negative=hard_negatives[j],
                                          fallback=fallback[j] if fallback is not None else None)
                scores[i] = positive.score
                if ranks[i] is None and searched_ranks[j] != BEYOND_K:
                    ranks[i] = int(searched_ranks[j])
                counts["hard_negatives_not_in_pool"][i] = has_hard_negative[i] and hard_negatives[j] is None
                for reason, count in choice.dropped.items():
                    counts[f"dropped_{reason}"][i] = count
                short = len(choice.negatives) < self.settings.num_negatives
                if short and self.on_shortage != "keep":
                    search.reject(i, "too_few_negatives",
                                  f"field 'negatives': {len(choice.negatives)} of {self.settings.num_negatives} "
                                  f"found (ranks {self.settings.min_rank}..{self.settings.max_rank}, ratio "
                                  f"{self.settings.ratio}, positive score {positive.score:.4f})")
                    continue
                negatives[i] = choice.negatives
                counts["negatives"][i] = len(choice.negatives)
                counts["hard_negatives_used"][i] = choice.hard_negative_used
                counts["padded"][i] = choice.padded
                counts["short_kept"][i] = short
        return search.output({"negatives": pa.array(negatives, pa.list_(pa.string())),
                              "positive_rank": pa.array(ranks, pa.int32()),
                              "positive_score": pa.array(scores, pa.float32()),
                              **{f"{STAT_PREFIX}{name}": pa.array(values) for name, values in counts.items()}})


def _resolve_teacher(cfg: MineConfig, metadata: dict[str, Any]) -> TeacherConfig:
    teacher = cfg.teacher or TeacherConfig(**metadata["teacher"])
    if teacher.pool_fingerprint() != metadata["encoding"]:
        raise ConfigError(f"teacher {teacher.pool_fingerprint()} differs from the one the pool "
                          f"{cfg.resolved_pool_dir()} was encoded with ({metadata['encoding']}); leave `teacher` "
                          "unset to use the pool's")
    return teacher


def run_mine(cfg: MineConfig, *, on_shard_committed: ShardHook | None = None) -> StageSummary:
    """Run (or resume) mining of ``cfg.input`` (a filter output) into ``cfg.output_dir``."""
    from babelforge.models.sources import resolve_model_dir
    from babelforge.utils.ray_env import init_ray

    fs, root = resolve_filesystem(cfg.input)
    if fs.get_file_info(posixpath.join(root, "filter.json")).type != pafs.FileType.File:
        raise ConfigError(f"input {cfg.input} is not a filter output (no filter.json); run `babelforge filter` first")
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    _, metadata = open_pool(cfg.resolved_pool_dir())
    teacher = _resolve_teacher(cfg, metadata)
    check_fingerprint(cfg.output_dir, "mine.json", {
        "input": cfg.input, "pool_dir": cfg.resolved_pool_dir(), "teacher": teacher.fingerprint(),
        "negatives": cfg.negatives.model_dump(mode="json"), "on_shortage": cfg.on_shortage,
        "pad_candidates": cfg.pad_candidates,
        "index": cfg.index.model_dump(mode="json", include={"kind", "nlist", "nprobe", "train_sample", "seed"})})
    files = ShardWriter(cfg.input, stage=FILTER_STAGE, schema=FILTERED_PAIR_SCHEMA).data_files()
    writer = ShardWriter(cfg.output_dir, stage=STAGE, schema=TRAINING_SCHEMA)
    model_path = str(resolve_model_dir(teacher.model))
    actor_kwargs = dict(model_path=model_path, pool_dir=cfg.resolved_pool_dir(), index=cfg.index.model_dump(),
                        teacher=teacher.model_dump(), negatives=cfg.negatives.model_dump(),
                        on_shortage=cfg.on_shortage, pad_candidates=cfg.pad_candidates)
    committed = stream_into_shards(
        writer, files, lambda pending: search_pipeline(pending, MineActor, actor_kwargs, teacher),
        on_shard_committed=on_shard_committed)
    summary = writer.summary()
    summary.extra["shards_this_run"] = committed
    return summary


def format_report(summary: StageSummary) -> str:
    """The summary line plus negatives per pair and why candidates were dropped."""
    extra = Counter({k: v for k, v in summary.extra.items() if isinstance(v, (int, float))})
    per_pair = f"{extra['negatives'] / summary.kept:.2f} per kept pair" if summary.kept else "no pair kept"
    dropped = ", ".join(f"{reason}={extra[f'dropped_{reason}']}" for reason in DROP_REASONS
                        if extra[f"dropped_{reason}"]) or "none"
    return (f"{summary.format()}\n[{STAGE}] {extra['negatives']} negatives ({per_pair}; "
            f"{extra['hard_negatives_used']} synthetic hard negatives used, {extra['padded']} padded, "
            f"{extra['short_kept']} pairs kept short); candidates dropped: {dropped}")
