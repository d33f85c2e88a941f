"""The training recipe every Ray Train worker runs: :func:`train_loop_per_worker`.

A loop composed of the stage's components, in order:

1. rows: the whole training dataset from ``ray.train.get_dataset_shard("train")``, put in
   canonical order (:func:`~babelforge.train.data.collect_rows`);
2. batches: :class:`~babelforge.train.batching.ContrastiveBatcher` (this worker's shard of every
   global batch) behind :class:`~babelforge.train.data.StepPlan` (the batches of step ``s``);
3. model + optimiser: :func:`~babelforge.train.engine.build_engine` (plain PyTorch or DeepSpeed);
4. resume: ``ray.train.get_checkpoint()`` -> :func:`~babelforge.train.checkpoint.restore_checkpoint`;
5. per step: seed dropout from ``(seed, step, rank)``, :class:`~babelforge.train.step.ContrastiveStep`
   on each batch with the engine's ``backward``, ``engine.step()``, step hooks;
6. every ``log_every`` steps ``ray.train.report`` of the window's metrics, every ``eval_every`` the
   dev evaluation, every ``checkpoint.every`` steps (and at the end) a checkpoint;
7. export: rank 0 saves the final model (all weights gathered at ZeRO-3) and ``training_summary.json``.

Hooks (``run_training(..., hooks=[...])``) are callables that get a :class:`StepRecord` after
every step on every rank; :class:`StepLog` (``monitor.step_log``) is the built-in one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from babelforge.train.batching import ContrastiveBatch, ContrastiveBatcher
from babelforge.train.checkpoint import (TrainingState, data_fingerprint, report_checkpoint, restore_checkpoint,
                                         seed_step)
from babelforge.train.config import TrainConfig
from babelforge.train.data import StepPlan, collect_rows
from babelforge.train.engine import TrainEngine, build_engine, export_model
from babelforge.train.losses import EmbeddingLoss, InfoNCELoss, MatryoshkaLoss
from babelforge.train.metrics import DevEvaluator, PrometheusExporter, ThroughputMeter
from babelforge.train.step import ContrastiveStep

log = logging.getLogger(__name__)

__all__ = ["train_loop_per_worker", "StepRecord", "StepHook", "StepLog", "build_loss", "SUMMARY_FILE"]

SUMMARY_FILE = "training_summary.json"


@dataclass(frozen=True)
class StepRecord:
    """What one worker did at one optimiser step.

    ``first_step`` is the first step this worker group ran (1 on a fresh start, the checkpoint's
    step + 1 after a restart); ``batch_ids_sha`` hashes the ids of this worker's rows of the step.
    """

    step: int
    first_step: int
    rank: int
    world_size: int
    batch_ids_sha: str
    loss: float
    lr: float


StepHook = Callable[[StepRecord], None]


class StepLog:
    """Rank 0 appends every :class:`StepRecord` as a JSON line to a local file (an audit trail)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, record: StepRecord) -> None:
        if record.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(record)) + "\n")


def build_loss(cfg: TrainConfig) -> EmbeddingLoss:
    """InfoNCE (gathered across workers), wrapped in Matryoshka when ``loss.matryoshka_dims`` is set."""
    settings = cfg.loss
    loss: EmbeddingLoss = InfoNCELoss(settings.temperature, bidirectional=settings.bidirectional,
                                      same_side=settings.same_side,
                                      false_negative_margin=settings.false_negative_margin)
    if settings.matryoshka_dims:
        loss = MatryoshkaLoss(loss, settings.matryoshka_dims, settings.matryoshka_weights)
    return loss


def _batch_ids_sha(batches: Sequence[ContrastiveBatch]) -> str:
    return hashlib.sha256("\n".join(i for b in batches for i in b.ids).encode()).hexdigest()[:16]


def _read_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    tables = shard.iter_batches(batch_format="pyarrow", batch_size=None)
    return collect_rows(tables, [s.weight for s in cfg.data.sources], cfg.data.batching.seed)


def _dev_metrics(dev: DevEvaluator, engine: TrainEngine, rank: int) -> dict[str, float]:
    """Dev scores on rank 0; at ZeRO-3 every rank runs the forward passes (they gather weights)."""
    if rank != 0 and not engine.partitions_parameters:
        return {}
    table = dev.encode(engine.module)
    return dev.score(table) if rank == 0 else {}


def _write_output(uri: str, writer: Callable[[Path], Any]) -> None:
    """Run ``writer(local_dir)`` and put what it wrote at ``uri`` (a local directory or any pyarrow URI)."""
    if "://" not in uri:
        Path(uri).mkdir(parents=True, exist_ok=True)
        writer(Path(uri))
        return
    import tempfile

    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="babelforge-export-") as tmp:
        writer(Path(tmp))
        filesystem, path = pafs.FileSystem.from_uri(uri)
        pafs.copy_files(tmp, path, destination_filesystem=filesystem)


def _log_to_stderr() -> None:
    """INFO logs of babelforge in the worker (Ray forwards them to the driver); other libraries stay quiet."""
    logger = logging.getLogger("babelforge")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _log_report(report: dict[str, Any], max_steps: int) -> None:
    dev = "".join(f" {k} {v:.4f}" for k, v in report.items() if k.startswith("dev/") and k.count("/") == 1)
    log.info("step %d/%d  loss %.4f  lr %.3g  pairs/s %.1f  tokens/s %.0f%s", report["step"], max_steps,
             report["loss"], report["lr"], report["pairs_per_second"], report["tokens_per_second"], dev)


def _export(cfg: TrainConfig, engine: TrainEngine, rank: int, summary: dict[str, Any]) -> None:
    """Rank 0 saves the final model (all ranks gather it at ZeRO-3) and ``training_summary.json``."""
    with engine.full_parameters():
        if rank != 0:
            return
        _write_output(cfg.final_model_uri(), lambda path: export_model(engine.module, path))
        _write_output(cfg.output_dir, lambda path: (path / SUMMARY_FILE).write_text(
            json.dumps({"final_model": cfg.final_model_uri(), **summary}, indent=2) + "\n", encoding="utf-8"))
        log.info("exported the final model to %s", cfg.final_model_uri())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` = ``{"config": TrainConfig as a dict, "hooks": [...]}``."""
    import ray.train
    import ray.train.torch

    _log_to_stderr()
    started = time.time()
    cfg = TrainConfig.model_validate(loop_config["config"])
    hooks: list[StepHook] = list(loop_config.get("hooks") or [])
    if cfg.monitor.step_log:
        hooks.append(StepLog(cfg.monitor.step_log))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)

    # Components: rows -> batches of each step; the engine; where training stands.
    batcher = ContrastiveBatcher(_read_rows(cfg), cfg.batching_config(world), rank=rank, world_size=world)
    plan = StepPlan(batcher, cfg.optim.accumulation_steps)
    fingerprint = data_fingerprint([row["id"] for row in batcher.rows], cfg.data.batching.model_dump(mode="json"))
    engine = build_engine(cfg, ray.train.torch.get_device(), world)
    checkpoint = ray.train.get_checkpoint()
    start = 0 if checkpoint is None else \
        restore_checkpoint(engine, checkpoint, fingerprint=fingerprint, world_size=world).step
    if rank == 0:
        log.info("%d rows, %d steps per epoch, %d worker(s); %s", len(batcher.rows), batcher.steps_per_epoch, world,
                 f"training steps {start + 1}..{cfg.optim.max_steps}" if start < cfg.optim.max_steps
                 else f"all {cfg.optim.max_steps} steps done already: exporting only")
    bf16_autocast = cfg.compute.precision == "bf16" and cfg.scaling.strategy == "ddp"
    step_fn = ContrastiveStep(engine.module, build_loss(cfg), max_query_length=cfg.model.max_query_length,
                              max_passage_length=cfg.model.max_passage_length, chunk_size=cfg.compute.chunk_size,
                              grad_cache=cfg.compute.grad_cache, pad_to_multiple_of=cfg.compute.pad_to_multiple_of,
                              autocast_dtype=torch.bfloat16 if bf16_autocast else None, forward_fn=engine.forward_fn)
    monitor = cfg.monitor
    dev = DevEvaluator(monitor.dev_eval) if monitor.eval_every and monitor.dev_eval else None
    exporter = PrometheusExporter(cfg.name) if monitor.prometheus and rank == 0 else None
    meter = ThroughputMeter()
    report: dict[str, Any] = {}
    max_steps = cfg.optim.max_steps

    for step in range(start + 1, max_steps + 1):
        seed_step(cfg.data.batching.seed, step, rank)
        batches = plan.batches(step)
        results = [step_fn.run(batch, backward_fn=engine.backward) for batch in batches]
        lr = engine.lr
        engine.step()
        meter.add_step(results)
        record = StepRecord(step=step, first_step=start + 1, rank=rank, world_size=world,
                            batch_ids_sha=_batch_ids_sha(batches), loss=sum(r.loss for r in results) / len(results),
                            lr=lr)
        for hook in hooks:
            hook(record)

        dev_scores: dict[str, float] = {}
        if dev is not None and step % monitor.eval_every == 0:
            evaluated = time.perf_counter()
            dev_scores = _dev_metrics(dev, engine, rank)
            meter.exclude(time.perf_counter() - evaluated)
        checkpoint_due = step % cfg.checkpoint.every == 0 or step == max_steps
        if not (checkpoint_due or dev_scores or step % monitor.log_every == 0):
            continue
        report = {**meter.report(step, plan.epoch_of(step), lr), **dev_scores}
        if rank == 0:
            _log_report(report, max_steps)
        if exporter is not None:
            exporter.record(report, engine.module.hidden_size)
        if not checkpoint_due:
            ray.train.report(report)
            continue
        saving = time.perf_counter()
        report_checkpoint(engine, TrainingState(step=step, epoch=plan.epoch_of(step), seed=cfg.data.batching.seed,
                                                world_size=world, data_fingerprint=fingerprint), report, rank)
        meter.exclude(time.perf_counter() - saving)
        if exporter is not None:
            exporter.record_checkpoint()

    _export(cfg, engine, rank, {
        "name": cfg.name, "storage": cfg.storage_uri(), "steps": max_steps, "resumed_from_step": start,
        "epochs": round(plan.epoch_of(max_steps), 4), "rows": len(batcher.rows),
        "steps_per_epoch": batcher.steps_per_epoch, "world_size": world, "strategy": cfg.scaling.strategy,
        "zero_stage": cfg.scaling.zero_stage, "precision": cfg.compute.precision,
        "worker_seconds": round(time.time() - started, 1), "last_report": report})
