"""Training metrics: what every report carries, the dev-set evaluation, and the Prometheus export.

Every ``monitor.log_every`` steps each worker calls ``ray.train.report`` with the dict built by
:class:`ThroughputMeter` (rank 0's copy is what Ray keeps)::

    {"step": 40, "epoch": 1.25, "loss": 2.31, "loss@384": 0.52, "loss@64": 0.71, "lr": 1.8e-05,
     "pairs_per_second": 41.7, "tokens_per_second": 3310.2, "step_seconds": 0.77}

``loss`` and the per-dimension terms are means over the window's steps of the global-batch loss
(the mean over workers of each worker's mean over its queries against all gathered candidates);
throughput counts the pairs and real tokens of all workers over the window's wall time.
:class:`DevEvaluator` adds ``dev/ndcg@10`` (mean over the dev tasks at the full dimension),
``dev/ndcg@10@<dim>``, ``dev/<task>/ndcg@10`` and ``dev/same_lang@10`` when a task measures it.

Rank 0 also records them as Ray metrics (:class:`PrometheusExporter`); Ray's metrics agent serves
them with a ``ray_`` prefix, counters with ``_total`` (:data:`EXPORTED_NAMES`, tagged ``run``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from babelforge.eval.config import EvalSettings, build_tasks
from babelforge.eval.metrics import MAIN_METRIC
from babelforge.eval.report import BIAS_METRIC
from babelforge.eval.runner import EmbeddingTable, evaluate_embeddings, texts_to_encode
from babelforge.models.embedder import Embedder
from babelforge.train.step import StepMetrics

log = logging.getLogger(__name__)

__all__ = ["ThroughputMeter", "DevEvaluator", "PrometheusExporter", "METRIC_PREFIX", "EXPORTED_NAMES"]

METRIC_PREFIX = "babelforge_train_"

# Name as scraped from Ray's metrics endpoint -> meaning. Every series has a `run` tag (the run name).
EXPORTED_NAMES: dict[str, str] = {
    "ray_babelforge_train_loss": "training loss, mean over the last log window",
    "ray_babelforge_train_loss_at_dim": "Matryoshka loss term per embedding size (tag `dim`)",
    "ray_babelforge_train_lr": "learning rate after the last step",
    "ray_babelforge_train_pairs_per_second": "training pairs per second, all workers",
    "ray_babelforge_train_tokens_per_second": "real (non-padding) tokens embedded per second, all workers",
    "ray_babelforge_train_step": "optimiser steps completed",
    "ray_babelforge_train_epoch": "epochs completed (fractional)",
    "ray_babelforge_train_dev_ndcg_at_10": "dev-set nDCG@10, mean over dev tasks (tag `dim`)",
    "ray_babelforge_train_pairs_total": "training pairs consumed (rate = pairs/s)",
    "ray_babelforge_train_tokens_total": "real tokens embedded (rate = tokens/s)",
    "ray_babelforge_train_checkpoints_total": "checkpoints reported",
}


class ThroughputMeter:
    """Accumulates this worker's step metrics between reports; :meth:`report` reduces over workers."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.terms: dict[str, float] = {}
        self.pairs = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self.paused = 0.0

    def add_step(self, batches: Sequence[StepMetrics]) -> None:
        """Add one optimiser step made of the :class:`StepMetrics` of its (accumulated) batches."""
        for metrics in batches:
            self.loss += metrics.loss / len(batches)
            for name, value in metrics.terms.items():
                self.terms[name] = self.terms.get(name, 0.0) + value / len(batches)
            self.pairs += metrics.pairs
            self.tokens += metrics.tokens
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, checkpointing) out of the throughput window."""
        self.paused += seconds

    def report(self, step: int, epoch: float, lr: float) -> dict[str, float]:
        """The window's metrics, reduced over all workers (a collective: every rank must call it)."""
        names = sorted(self.terms)
        totals = torch.tensor([self.loss, *(self.terms[n] for n in names), float(self.pairs), float(self.tokens)],
                              dtype=torch.float64)
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(totals)
        seconds = max(1e-9, time.perf_counter() - self.started - self.paused)
        steps = max(1, self.steps)
        values = totals.tolist()
        report = {"step": step, "epoch": round(epoch, 4), "loss": values[0] / (steps * world)}
        report.update({name: value / (steps * world) for name, value in zip(names, values[1:-2])})
        report.update(lr=lr, pairs_per_second=values[-2] / seconds, tokens_per_second=values[-1] / seconds,
                      step_seconds=seconds / steps, pairs=values[-2], tokens=values[-1])
        self._reset()
        return report


class DevEvaluator:
    """Scores the model being trained on a small dev configuration, in process (no model export).

    The texts of all tasks are encoded with the live model (:meth:`Embedder.encode`) and scored by
    :func:`babelforge.eval.runner.evaluate_embeddings`, the evaluator's own scoring.
    """

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        self.tasks, _ = build_tasks(settings)
        self.keys = texts_to_encode(self.tasks)
        log.info("dev evaluation: %d tasks, %d distinct texts", len(self.tasks), len(self.keys))

    def encode(self, model: Embedder) -> EmbeddingTable:
        """Embed every dev text (every rank must call this at ZeRO-3: forward passes gather weights)."""
        by_prompt: dict[str | None, list[int]] = {}
        for row, (prompt, _) in enumerate(self.keys):
            by_prompt.setdefault(prompt, []).append(row)
        vectors = np.zeros((len(self.keys), model.hidden_size), dtype=np.float32)
        for prompt, rows in by_prompt.items():
            vectors[rows] = model.encode([self.keys[r][1] for r in rows], prompt_name=prompt,
                                         batch_size=self.settings.batch_size)
        return EmbeddingTable(vectors=vectors, rows={k: i for i, k in enumerate(self.keys)})

    def score(self, table: EmbeddingTable) -> dict[str, float]:
        report = evaluate_embeddings(self.tasks, table, dims=self.settings.dims, metrics=self.settings.metrics)
        full = report.dims[0]
        out = {f"dev/{MAIN_METRIC}": _mean(t.metrics[full][MAIN_METRIC] for t in report.tasks)}
        for dim in report.dims[1:]:
            out[f"dev/{MAIN_METRIC}@{dim}"] = _mean(t.metrics[dim][MAIN_METRIC] for t in report.tasks)
        out.update({f"dev/{t.name}/{MAIN_METRIC}": t.metrics[full][MAIN_METRIC] for t in report.tasks})
        bias = report.language_bias()
        if bias:
            out[f"dev/{BIAS_METRIC}"] = bias[full]
        return out


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


class PrometheusExporter:
    """Ray metrics of one run (create on rank 0 only: every call records a sample)."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"run": run}

        def gauge(name: str, description: str, extra: Sequence[str] = ()) -> Gauge:
            return Gauge(METRIC_PREFIX + name, description, tag_keys=("run", *extra)).set_default_tags(tags)

        def counter(name: str, description: str) -> Counter:
            return Counter(METRIC_PREFIX + name, description, tag_keys=("run",)).set_default_tags(tags)

        self.loss = gauge("loss", "Training loss, mean over the last log window")
        self.loss_at_dim = gauge("loss_at_dim", "Matryoshka loss term per embedding size", ("dim",))
        self.lr = gauge("lr", "Learning rate")
        self.pairs_per_second = gauge("pairs_per_second", "Training pairs per second, all workers")
        self.tokens_per_second = gauge("tokens_per_second", "Real tokens embedded per second, all workers")
        self.step = gauge("step", "Optimiser steps completed")
        self.epoch = gauge("epoch", "Epochs completed")
        self.dev_ndcg = gauge("dev_ndcg_at_10", "Dev-set nDCG@10, mean over dev tasks", ("dim",))
        self.pairs = counter("pairs", "Training pairs consumed")
        self.tokens = counter("tokens", "Real tokens embedded")
        self.checkpoints = counter("checkpoints", "Checkpoints reported")

    def record(self, report: dict[str, float], full_dim: int) -> None:
        """Record one report dict (from :class:`ThroughputMeter` and :class:`DevEvaluator`)."""
        simple = {"loss": self.loss, "lr": self.lr, "pairs_per_second": self.pairs_per_second,
                  "tokens_per_second": self.tokens_per_second, "step": self.step, "epoch": self.epoch}
        for key, gauge in simple.items():
            if key in report:
                gauge.set(float(report[key]))
        for key, value in report.items():
            if key.startswith("loss@"):
                self.loss_at_dim.set(float(value), tags={"dim": key[len("loss@"):]})
            elif key == f"dev/{MAIN_METRIC}":
                self.dev_ndcg.set(float(value), tags={"dim": str(full_dim)})
            elif key.startswith(f"dev/{MAIN_METRIC}@"):
                self.dev_ndcg.set(float(value), tags={"dim": key.rsplit("@", 1)[1]})
        if report.get("pairs"):
            self.pairs.inc(float(report["pairs"]))
        if report.get("tokens"):
            self.tokens.inc(float(report["tokens"]))

    def record_checkpoint(self) -> None:
        self.checkpoints.inc(1)
