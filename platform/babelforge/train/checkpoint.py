"""Training checkpoints: engine state + where training stands, reported to Ray Train's storage.

A checkpoint directory holds the engine's state (``torch_state.pt`` written by rank 0, or the
DeepSpeed checkpoint ``deepspeed/`` whose ZeRO partitions every rank writes) and
``training_state.json``::

    {"step": 40, "epoch": 1.25, "seed": 0, "world_size": 2, "data_fingerprint": "3f9c…", "attempt": 1}

``step`` is the number of optimiser steps completed. Nothing else is needed to continue: the
batches of step ``s`` are a function of the rows and the batching seed
(:class:`~babelforge.train.data.StepPlan`), and the loop seeds dropout from ``(seed, step,
rank)`` (:func:`seed_step`), so no data-loader position or RNG state is saved. The
``data_fingerprint`` (a hash of the row ids in training order and the batching settings) makes a
resume with different data or batching an error instead of silently training on another plan.

Every rank calls :func:`report_checkpoint`, Ray Train merges the ranks' directories into one
under ``<storage_path>/<name>/`` (local or ``s3://``) and keeps the newest
``checkpoint.keep``; on a restart (after a worker failure, or when the same command is run
again) ``ray.train.get_checkpoint()`` returns the newest one and :func:`restore_checkpoint`
loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from babelforge.errors import ConfigError
from babelforge.train.engine import TrainEngine

log = logging.getLogger(__name__)

__all__ = ["TrainingState", "STATE_FILE", "data_fingerprint", "seed_step", "report_checkpoint",
           "restore_checkpoint"]

STATE_FILE = "training_state.json"


@dataclass
class TrainingState:
    """Where training stands after ``step`` optimiser steps."""

    step: int
    epoch: float
    seed: int
    world_size: int
    data_fingerprint: str
    attempt: int = 1

    @classmethod
    def read(cls, directory: Path) -> "TrainingState":
        path = directory / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"checkpoint {directory} has no {STATE_FILE}; it was not written by babelforge train")
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def data_fingerprint(row_ids: Sequence[str], batching: dict[str, Any]) -> str:
    """SHA-256 of the training row ids (in order) and the batching settings."""
    digest = hashlib.sha256(json.dumps(batching, sort_keys=True, default=str).encode())
    for row_id in row_ids:
        digest.update(row_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's RNGs (dropout) from ``(seed, step, rank)``: a repeated step draws the same masks."""
    torch.manual_seed(zlib.crc32(f"{seed}:{step}:{rank}".encode()))


def report_checkpoint(engine: TrainEngine, state: TrainingState, metrics: dict[str, Any], rank: int) -> None:
    """Write this rank's part of the checkpoint and report it with ``metrics`` (all ranks must call this)."""
    import ray.train

    directory = Path(tempfile.mkdtemp(prefix=f"babelforge-ckpt-{state.step}-"))
    try:
        writes = engine.shards_checkpoint or rank == 0
        if writes:
            engine.save_state(directory)
        if rank == 0:
            state.write(directory)
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if writes else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{state.step:08d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def restore_checkpoint(engine: TrainEngine, checkpoint: Any, *, fingerprint: str, world_size: int) -> TrainingState:
    """Load a reported checkpoint into ``engine``; refuse one made for other data or another world size."""
    with checkpoint.as_directory() as path:
        directory = Path(path)
        state = TrainingState.read(directory)
        if state.data_fingerprint != fingerprint:
            raise ConfigError(f"checkpoint {checkpoint.path} was trained on other rows or batching settings "
                              f"(fingerprint {state.data_fingerprint}, now {fingerprint}); resume with the same data, "
                              "or start a new run (another `name` or `storage_path`)")
        if engine.shards_checkpoint and state.world_size != world_size:
            raise ConfigError(f"checkpoint {checkpoint.path} holds ZeRO partitions of {state.world_size} workers; "
                              f"resume with scaling.num_workers={state.world_size}")
        engine.load_state(directory)
    log.info("resumed from %s at step %d (epoch %.2f)", checkpoint.path, state.step, state.epoch)
    return state
