"""DeepSpeed ZeRO-2 and ZeRO-3 through Ray Train's TorchTrainer on CPU (gloo), 2 workers each.

One test runs both stages so the DeepSpeed shm op compiles at most once (~45 s the very first time
on a machine, cached in ~/.cache/torch_extensions afterwards). The tiny model has dropout off, so
the first step's loss is a deterministic function of the weights and the global batch: averaged
over the two workers (each worker's queries against the gathered passages of both) it must equal
one process's loss on the whole global batch (float32, 1e-5 relative).

The training set is small (48 NTREX pairs in a mine-stage output directory of two parquet files,
read by ``ray.data.read_parquet``; 6 steps per epoch) so that 18 steps at lr 3e-3 visibly fit it:
the loss of the last 3 steps must be under half the first 3 steps'. ZeRO-3 also runs
GradCache (3-row chunks, one ``engine.backward`` per chunk through ``forward_fn=engine``), the dev
evaluation (every rank runs the forward passes of the partitioned model), the export of the
gathered weights and the Prometheus metrics (scraped from the node's metrics endpoint).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch

from babelforge.config import load_config_dict
from babelforge.data.pairs import ntrex_pairs
from babelforge.models import Embedder
from babelforge.train.batching import ContrastiveBatcher
from babelforge.train.config import TrainConfig
from babelforge.train.data import SOURCE_COLUMN, collect_rows, pairs_to_training
from babelforge.train.loop import build_loss
from babelforge.train.metrics import EXPORTED_NAMES
from babelforge.train.step import ContrastiveStep
from babelforge.train.trainer import run_training

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_STEPS = 18
DEV_EVAL = {"use_ray": False, "dims": [32, 8], "tasks": [
    {"type": "ntrex", "setting": "cross-lingual", "pairs": ["de-en"], "split": "heldout", "lines": "1000:1300"}]}


class RecordEveryRank:
    """Every rank appends its step records to ``<dir>/rank<r>.jsonl``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, record) -> None:
        path = Path(self.directory) / f"rank{record.rank}.jsonl"
        with path.open("a") as out:
            out.write(json.dumps({"step": record.step, "loss": record.loss}) + "\n")


@pytest.fixture(scope="module")
def mined_parquet(tmp_path_factory) -> Path:
    """48 NTREX en-de training rows as a mine-stage output directory (``<dir>/data/*.parquet``)."""
    root = tmp_path_factory.mktemp("mined")
    (root / "data").mkdir()
    rows = pairs_to_training(ntrex_pairs(["en-de"], max_pairs=48))
    pq.write_table(rows.slice(0, 20), root / "data" / "part-00000.parquet")
    pq.write_table(rows.slice(20), root / "data" / "part-00001.parquet")
    return root


@pytest.fixture(scope="module")
def dropout_free_tiny(tmp_path_factory, tiny_encoder_dir):
    """The session's tiny encoder with dropout off (deterministic steps)."""
    target = tmp_path_factory.mktemp("tiny-no-dropout")
    model = Embedder.from_pretrained(tiny_encoder_dir)
    model.backbone.config.hidden_dropout_prob = 0.0
    model.backbone.config.attention_probs_dropout_prob = 0.0
    return model.save_pretrained(target)


def config(tmp: Path, base: Path, data_dir: Path, stage: int, **sections) -> TrainConfig:
    data = {"sources": [{"parquet": str(data_dir)}], "batching": {"batch_size": 8}}
    return load_config_dict({
        "name": f"zero{stage}", "output_dir": str(tmp / f"zero{stage}"),
        "model": {"base": str(base), "max_query_length": 32, "max_passage_length": 32},
        "data": data, "loss": {"temperature": 0.05, "matryoshka_dims": [32, 16, 8]},
        "optim": {"lr": 3e-3, "max_steps": MAX_STEPS, "warmup_steps": 0, "schedule": "constant"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "strategy": "deepspeed", "zero_stage": stage},
        "checkpoint": {"every": MAX_STEPS, "max_failures": 0},
        "monitor": {"log_every": 6, "prometheus": False}, **sections,
    }, TrainConfig, source=f"zero{stage} (test)")


def losses_by_rank(directory: Path) -> list[list[float]]:
    ranks = []
    for rank in (0, 1):
        records = [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
        ranks.append([r["loss"] for r in records])
    return ranks


def single_process_first_loss(cfg: TrainConfig, data_dir: Path) -> float:
    """The loss of step 1's whole global batch in this process (no workers, no gather)."""
    table = pq.read_table(data_dir / "data")
    rows = collect_rows([table.append_column(SOURCE_COLUMN, pa.array([0] * table.num_rows, pa.int32()))], [1.0], seed=0)
    batcher = ContrastiveBatcher(rows, cfg.batching_config(1))
    model = Embedder.from_pretrained(cfg.model.base).train()
    step = ContrastiveStep(model, build_loss(cfg), max_query_length=32, max_passage_length=32)
    with torch.no_grad():
        return step.run(batcher.shard(batcher.plan(0)[0], 0, 0), backward_fn=lambda loss: None).loss


def assert_exported_to_prometheus(ray, run: str) -> None:
    """Every documented metric is on the node's metrics endpoint with the run's tag."""
    import httpx

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, missing = time.monotonic() + 40, list(EXPORTED_NAMES)   # the agent flushes every few seconds
    while missing and time.monotonic() < deadline:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        missing = [name for name in EXPORTED_NAMES
                   if not any(line.startswith(name + "{") and f'run="{run}"' in line for line in lines)]
        if missing:
            time.sleep(1)
    assert not missing


def test_zero2_and_zero3_train_on_cpu_reduce_loss_and_export(ray_local, dropout_free_tiny, mined_parquet, tmp_path):
    timings = {}
    for stage in (2, 3):
        records = tmp_path / f"records{stage}"
        records.mkdir()
        extra = {}
        if stage == 3:
            extra = {"compute": {"chunk_size": 3, "grad_cache": True},
                     "monitor": {"log_every": 6, "eval_every": MAX_STEPS, "dev_eval": DEV_EVAL, "prometheus": True}}
        cfg = config(tmp_path, dropout_free_tiny, mined_parquet, stage, **extra)
        started = time.perf_counter()
        result = run_training(cfg, hooks=[RecordEveryRank(str(records))])
        timings[stage] = time.perf_counter() - started

        rank0, rank1 = losses_by_rank(records)
        global_losses = [(a + b) / 2 for a, b in zip(rank0, rank1)]
        first, last = sum(global_losses[:3]) / 3, sum(global_losses[-3:]) / 3
        assert last < 0.5 * first, (stage, global_losses)
        if stage == 2:  # gathered 2-worker loss == one process on the whole global batch
            expected = single_process_first_loss(cfg, mined_parquet)
            assert abs(global_losses[0] - expected) <= 1e-5 * expected, (global_losses[0], expected)
        else:
            assert {"dev/ndcg@10", "dev/ndcg@10@8", "dev/ntrex/de-en/ndcg@10"} <= set(result.metrics)
            assert_exported_to_prometheus(ray_local, run="zero3")

        final = Embedder.from_pretrained(result.final_model_dir)
        assert final.config.matryoshka_dims == [16, 8]
        base = Embedder.from_pretrained(cfg.model.base)
        changed = [n for n, p in final.state_dict().items() if not torch.allclose(p, base.state_dict()[n])]
        assert len(changed) > 10, "the exported weights are the trained (gathered) ones"
        assert result.summary["zero_stage"] == stage and result.metrics["step"] == MAX_STEPS
    print(f"\nTorchTrainer wall time: ZeRO-2 {timings[2]:.0f} s, ZeRO-3 + GradCache + dev eval {timings[3]:.0f} s")
