"""Failure recovery through Ray Train: a worker killed mid-run, and a whole run that failed and is rerun.

Both runs train the tiny model with 2 workers (DDP math), checkpoint every 2 steps and a constant
learning rate, and crash one worker with ``os._exit(1)`` on the first attempt only (a marker file):

- run A (``FailureConfig(max_failures=1)``): rank 1 dies at step 5; Ray Train restarts the worker
  group, which resumes from the last checkpoint (step 4, or 2 if Ray had not registered 4 yet);
- run B (``max_failures=0``): rank 1 dies at step 7, the fit fails; the same configuration run again
  resumes from the last checkpoint (6, or 4) (Ray Train V2: same ``name`` + ``storage_path``).

Rank 0's step log (``monitor.step_log``) shows which steps ran, on which attempt and on which rows.
A and B are interrupted at different steps, so their final weights agree only if model, optimiser
and schedule state are restored exactly and no step is lost or applied twice.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from babelforge.config import load_config_dict
from babelforge.models import Embedder
from babelforge.train.config import TrainConfig
from babelforge.train.trainer import run_training

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # hooks travel to the workers by value

MAX_STEPS = 9          # 6 steps per epoch: the run crosses an epoch boundary
CHECKPOINT_EVERY = 2


class CrashOnce:
    """Kill the worker of ``rank`` right after ``step`` on the first attempt (before any report)."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, record) -> None:
        if record.step == self.step and record.rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


def tiny_config(tmp: Path, base: Path, *, name: str, max_failures: int) -> TrainConfig:
    return load_config_dict({
        "name": name, "output_dir": str(tmp / name), "model": {"base": str(base), "max_query_length": 32,
                                                               "max_passage_length": 32},
        "data": {"sources": [{"ntrex": {"pairs": ["en-de"], "max_pairs": 48}}], "batching": {"batch_size": 8}},
        "loss": {"temperature": 0.05, "matryoshka_dims": [32, 16]},
        "optim": {"lr": 1e-3, "max_steps": MAX_STEPS, "schedule": "constant"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 2, "max_failures": max_failures},
        "monitor": {"log_every": 3, "step_log": str(tmp / name / "steps.jsonl"), "prometheus": False},
    }, TrainConfig, source=f"{name} (test)")


def read_log(cfg: TrainConfig) -> list[dict]:
    return [json.loads(line) for line in Path(cfg.monitor.step_log).read_text().splitlines()]


def by_step(records: list[dict]) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        steps[record["step"]].append(record)
    return steps


@pytest.fixture(scope="module")
def runs(ray_local, tiny_encoder_dir, tmp_path_factory):
    from ray.train import TrainingFailedError

    tmp = tmp_path_factory.mktemp("resume")
    run_a = tiny_config(tmp, tiny_encoder_dir, name="crash-in-run", max_failures=1)
    result_a = run_training(run_a, hooks=[CrashOnce(5, rank=1, marker=str(tmp / "a.crashed"))])

    run_b = tiny_config(tmp, tiny_encoder_dir, name="crash-then-rerun", max_failures=0)
    crash_b = CrashOnce(7, rank=1, marker=str(tmp / "b.crashed"))
    with pytest.raises(TrainingFailedError):
        run_training(run_b, hooks=[crash_b])
    log_before_rerun = read_log(run_b)
    result_b = run_training(run_b, hooks=[crash_b])   # the same command again
    return {"a": (run_a, result_a), "b": (run_b, result_b, log_before_rerun)}


def restart_step(records: list[dict], crash_step: int) -> int:
    """The checkpoint step the restarted attempt resumed from (its first step - 1), checked to be valid.

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    2 s), so a worker that dies right after a report may take that registration with it: the
    restart then resumes from the checkpoint before. Either is "the last checkpoint" Ray had.
    """
    starts = sorted({r["first_step"] for r in records})
    assert len(starts) == 2 and starts[0] == 1, f"exactly one restart, got attempts starting at {starts}"
    resumed = starts[1] - 1
    assert resumed % CHECKPOINT_EVERY == 0 and crash_step - 2 * CHECKPOINT_EVERY < resumed < crash_step, resumed
    return resumed


def assert_replayed_identically(records: list[dict]) -> None:
    for step, runs in by_step(records).items():
        for again in runs[1:]:  # same rows, same dropout seed, same restored weights: the same loss
            assert again["batch_ids_sha"] == runs[0]["batch_ids_sha"], step
            assert abs(again["loss"] - runs[0]["loss"]) <= 1e-5 * abs(runs[0]["loss"]), step


def test_a_killed_worker_resumes_from_the_last_checkpoint_without_losing_or_repeating_steps(runs):
    cfg, result = runs["a"]
    records = read_log(cfg)
    resumed = restart_step(records, crash_step=5)
    steps = by_step(records)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))       # nothing lost
    repeated = {s for s, rs in steps.items() if len(rs) > 1}
    assert repeated <= set(range(resumed + 1, 6)), "only steps after the restored checkpoint run twice"
    assert [r["step"] for r in records if r["first_step"] > 1] == list(range(resumed + 1, MAX_STEPS + 1))
    assert_replayed_identically(records)
    assert result.checkpoint_path.endswith(f"step_{MAX_STEPS:08d}")
    assert result.metrics["step"] == MAX_STEPS
    assert result.summary["resumed_from_step"] == resumed


def test_rerunning_a_failed_run_resumes_it_and_ends_with_the_same_weights(runs):
    cfg_a, result_a = runs["a"]
    cfg_b, result_b, before = runs["b"]
    assert [r["step"] for r in before] == list(range(1, 8))      # rank 0 logged 7 before rank 1 died
    records = read_log(cfg_b)
    resumed = restart_step(records, crash_step=7)
    assert [r["step"] for r in records if r["first_step"] > 1] == list(range(resumed + 1, MAX_STEPS + 1))
    assert_replayed_identically(records)
    assert result_b.summary["resumed_from_step"] == resumed
    # A and B were interrupted at different steps: equal final weights mean exact restores and no
    # step lost or applied twice.
    a = Embedder.from_pretrained(result_a.final_model_dir).state_dict()
    b = Embedder.from_pretrained(result_b.final_model_dir).state_dict()
    for name, tensor in a.items():
        assert torch.allclose(tensor, b[name], rtol=0, atol=1e-6), name
    base = Embedder.from_pretrained(cfg_a.model.base).state_dict()
    assert any(not torch.allclose(base[n], t) for n, t in a.items())   # and it did train
