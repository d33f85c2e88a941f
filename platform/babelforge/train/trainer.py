"""Run a training job on Ray Train: :func:`run_training` builds the ``TorchTrainer`` and fits it.

    >>> from babelforge.config import load_config
    >>> cfg = load_config("jobs/configs/train_tiny.yaml", TrainConfig)          # doctest: +SKIP
    >>> result = run_training(cfg)                                              # doctest: +SKIP
    >>> result.final_model_dir, result.metrics["loss"]                          # doctest: +SKIP
    ('outputs/train-tiny/final', 1.93)

The run is identified by ``(name, storage_path)``: Ray Train V2 keeps its checkpoints under
``<storage_path>/<name>/`` and a worker failure restarts the worker group from the newest one
(up to ``checkpoint.max_failures`` times); running the same configuration again, after a crash of
the whole job, resumes from it too. A finished run rerun re-exports the final model and trains
no further step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from babelforge.train.config import TrainConfig
from babelforge.train.data import build_training_dataset
from babelforge.train.loop import SUMMARY_FILE, StepHook, train_loop_per_worker
from babelforge.utils.ray_env import init_ray

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "build_trainer", "run_training"]


@dataclass
class TrainResult:
    """Where the trained model and the checkpoints are, and the last reported metrics."""

    final_model_dir: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str
    summary: dict[str, Any] = field(default_factory=dict)


def build_trainer(cfg: TrainConfig, hooks: Sequence[StepHook] = ()):
    """The ``TorchTrainer`` of ``cfg``: every worker reads the whole dataset (the batcher shards batches)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg.with_absolute_paths()

    scaling = cfg.scaling
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "hooks": list(hooks)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_uri(),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        datasets={"train": build_training_dataset(cfg.data.sources)},
        dataset_config=DataConfig(datasets_to_split=[]))


def _read_summary(output_dir: str) -> dict[str, Any]:
    from babelforge.data.shards import resolve_filesystem

    filesystem, path = resolve_filesystem(output_dir.rstrip("/") + "/" + SUMMARY_FILE)
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        return {}


def run_training(cfg: TrainConfig, *, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train on the current Ray cluster (a local one is started if none is); see the module docstring.

    ``hooks`` are called on every worker after every step with a
    :class:`~babelforge.train.loop.StepRecord` (they are pickled to the workers).
    Raises ``ray.train.TrainingFailedError`` when the workers failed more than
    ``checkpoint.max_failures`` times; rerunning resumes from the last checkpoint.
    """
    cfg = cfg.with_absolute_paths()
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    result = build_trainer(cfg, hooks).fit()
    checkpoint = result.checkpoint
    log.info("training %s finished; final model at %s", cfg.name, cfg.final_model_uri())
    return TrainResult(final_model_dir=cfg.final_model_uri(), metrics=dict(result.metrics or {}),
                       checkpoint_path=checkpoint.path if checkpoint is not None else None,
                       storage_path=f"{cfg.storage_uri().rstrip('/')}/{cfg.name}",
                       summary=_read_summary(cfg.output_dir))
