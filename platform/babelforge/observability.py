"""Prometheus metrics of the data stages (ingest, synth, filter, mine), exported through Ray.

Every committed shard of a :class:`~babelforge.data.shards.ShardWriter` is recorded here (the
writer calls :func:`record_shard_commit`), so the counters follow exactly what the stage's
manifest counts: rows in, rows kept, rows quarantined by reason code, shards committed and the
time each shard took. Shards that the synth stage commits also carry generation statistics in
``ShardStats.extra`` (``generations``, ``prompt_tokens``, ``generated_tokens``,
``generation_seconds``, see :mod:`babelforge.synth.stage`), which feed the ``babelforge_synth_*``
counters. Shards skipped because an earlier run committed them are not counted again.

Metrics are created with ``ray.util.metrics`` in the process that commits (the job driver) and
exported by Ray's metrics agent on every node's metrics export port, where Prometheus scrapes
them with Ray's own metrics: Ray prefixes ``ray_`` and counters end in ``_total``.
:data:`EXPORTED_NAMES` lists the scraped names (``dashboards/data_pipeline.json`` queries them)::

    rate(ray_babelforge_data_rows_total{outcome="kept"}[5m])         kept rows/s by stage
    rate(ray_babelforge_synth_generated_tokens_total[5m])             generated tokens/s

Recording is a no-op when Ray is not initialised (unit tests, plain library use) and never
fails a commit. Ray's core worker flushes metrics every few seconds, so the last shard of a job
whose driver exits right after committing may not be exported.

The ``stage`` tag is the writer's stage, except for a stage's internal working outputs (a writer
under an ``_``-prefixed directory, such as ingest's ``_ingest/staging``), which are tagged
``<stage>.<directory>`` (``ingest.staging``) so that their rows are not counted twice with the
stage's final output.
"""

from __future__ import annotations

import logging
import posixpath
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from babelforge.data.shards import ShardStats

log = logging.getLogger(__name__)

__all__ = ["record_shard_commit", "stage_label", "EXPORTED_NAMES", "SHARD_SECONDS_BOUNDARIES"]

SHARD_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]

# Name as scraped from Ray's metrics endpoint -> meaning (histograms add _bucket, _sum, _count).
EXPORTED_NAMES: dict[str, str] = {
    "ray_babelforge_data_rows_in_total": "input rows of committed shards, by stage",
    "ray_babelforge_data_rows_total": "output rows of committed shards, by stage and outcome (kept | quarantined)",
    "ray_babelforge_data_quarantined_total": "quarantined rows of committed shards, by stage and reason code",
    "ray_babelforge_data_shards_committed_total": "shards committed, by stage",
    "ray_babelforge_data_shard_seconds": "histogram of the wall time from opening to committing a shard, by stage",
    "ray_babelforge_synth_generations_total": "generations run (retries included), by stage",
    "ray_babelforge_synth_prompt_tokens_total": "prompt tokens sent to the generation backend, by stage",
    "ray_babelforge_synth_generated_tokens_total": "tokens generated (rate = generated tokens/s), by stage",
    "ray_babelforge_synth_generation_seconds_total": "generation wall time attributed to committed shards, by stage",
    "ray_babelforge_synth_accepted_total": "generated examples that passed validation (kept rows), by stage",
}

# ShardStats.extra key of a synth shard -> counter it feeds (without the babelforge_synth_ prefix).
_SYNTH_EXTRA_COUNTERS: dict[str, str] = {
    "generations": "generations",
    "prompt_tokens": "prompt_tokens",
    "generated_tokens": "generated_tokens",
    "generation_seconds": "generation_seconds",
}


class _DataMetrics:
    """The metric objects of this process (Ray allows one registration per name and process)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.rows_in = Counter("babelforge_data_rows_in", "Input rows of committed shards", tag_keys=("stage",))
        self.rows = Counter("babelforge_data_rows", "Output rows of committed shards by outcome (kept|quarantined)",
                            tag_keys=("stage", "outcome"))
        self.quarantined = Counter("babelforge_data_quarantined", "Quarantined rows of committed shards by reason",
                                   tag_keys=("stage", "reason"))
        self.shards = Counter("babelforge_data_shards_committed", "Shards committed", tag_keys=("stage",))
        self.shard_seconds = Histogram("babelforge_data_shard_seconds", "Wall time from opening to committing a shard",
                                       boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=("stage",))
        self.synth = {
            key: Counter(f"babelforge_synth_{name}", f"Synthesis {name.replace('_', ' ')} of committed shards",
                         tag_keys=("stage",))
            for key, name in _SYNTH_EXTRA_COUNTERS.items()
        }
        self.synth_accepted = Counter("babelforge_synth_accepted", "Generated examples that passed validation",
                                      tag_keys=("stage",))

    def record(self, stage: str, stats: ShardStats) -> None:
        tags = {"stage": stage}
        _inc(self.rows_in, stats.rows_in, tags)
        _inc(self.rows, stats.kept, {**tags, "outcome": "kept"})
        _inc(self.rows, stats.rejected, {**tags, "outcome": "quarantined"})
        for reason, count in stats.quarantined.items():
            _inc(self.quarantined, count, {**tags, "reason": reason or "unspecified"})
        self.shards.inc(1, tags=tags)
        self.shard_seconds.observe(float(stats.seconds), tags=tags)
        if "generations" in stats.extra:
            for key, counter in self.synth.items():
                _inc(counter, stats.extra.get(key, 0), tags)
            _inc(self.synth_accepted, stats.kept, tags)


def _inc(counter: Any, value: Any, tags: dict[str, str]) -> None:
    """Ray counters reject increments <= 0; a shard that kept nothing adds nothing."""
    if isinstance(value, (int, float)) and value > 0:
        counter.inc(value, tags=tags)


_metrics: _DataMetrics | None = None
_metrics_lock = threading.Lock()


def _data_metrics() -> _DataMetrics:
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = _DataMetrics()
        return _metrics


def stage_label(stage: str, output_dir: str) -> str:
    """The ``stage`` tag of a writer: ``stage``, or ``stage.<dir>`` for an internal output under ``_*/``."""
    path = output_dir.split("://", 1)[-1].rstrip("/")
    parent = posixpath.basename(posixpath.dirname(path))
    return f"{stage}.{posixpath.basename(path)}" if parent.startswith("_") else stage


def record_shard_commit(stage: str, output_dir: str, stats: ShardStats) -> None:
    """Count one committed shard; a no-op unless Ray is initialised in this process.

    Ray is looked up in ``sys.modules`` rather than imported: a process that never imported Ray
    has no cluster to report to, and importing it here would defeat the loopback setup that
    :mod:`babelforge.utils.ray_env` must do before the first ``import ray``.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        _data_metrics().record(stage_label(stage, output_dir), stats)
    except Exception:  # metrics must never fail a commit whose files are already in place
        log.warning("could not record metrics of shard %s of stage %s", stats.shard, stage, exc_info=True)
