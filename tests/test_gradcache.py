"""GradCache: cached-gradient steps give the uncached step's gradients (dropout on, RNG replayed).

Gradients are compared with the whole-model relative error of ``test_losses`` (1e-5, float32).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import pytest
import torch

from babelforge.models.tiny import build_tiny_embedder
from babelforge.train import gradcache
from babelforge.train.distributed import launch_local
from babelforge.train.gradcache import plan_chunks
from babelforge.train.losses import InfoNCELoss, MatryoshkaLoss
from babelforge.train.step import ContrastiveStep
from test_losses import (GRAD_RTOL, assert_grads_close, multiparallel_batch, ntrex_batch, shard,  # noqa: F401
                         single_thread)


def full_loss() -> MatryoshkaLoss:
    return MatryoshkaLoss(InfoNCELoss(0.05, bidirectional=True, same_side=True, false_negative_margin=0.1),
                          dims=[32, 16, 8], weights=[1.0, 1.0, 0.5])


def step_grads(grad_cache: bool, *, seed: int = 1, train: bool = True, arch: str = "xlm-roberta", batch=None,
               chunk_size: int | None = 3, backward_fn=None, world: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    model = build_tiny_embedder(arch, seed=0).train(train)
    step = ContrastiveStep(model, full_loss(), chunk_size=chunk_size, grad_cache=grad_cache,
                           max_query_length=48, max_passage_length=48)
    torch.manual_seed(seed)
    metrics = step.run(batch or ntrex_batch(8, negatives=2), **({"backward_fn": backward_fn} if backward_fn else {}))
    loss = torch.tensor(metrics.loss)
    grads = {}
    for name, param in model.named_parameters():
        if world > 1:
            torch.distributed.all_reduce(param.grad)
        grads[name] = param.grad / world
    if world > 1:
        torch.distributed.all_reduce(loss)
    return float(loss) / world, grads


def test_chunk_plan_sorts_rows_and_trims_padding_on_either_side():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    chunks = plan_chunks(mask, chunk_size=2)
    assert [c.rows.tolist() for c in chunks] == [[1, 2], [0, 3]]
    assert [c.columns for c in chunks] == [slice(0, 6), slice(0, 2)]
    left = mask.flip(1)
    assert [c.columns for c in plan_chunks(left, chunk_size=2)] == [slice(0, 6), slice(4, 6)]
    assert [c.columns for c in plan_chunks(mask, chunk_size=2, pad_to_multiple_of=4)] == [slice(0, 6), slice(0, 4)]
    assert [c.columns for c in plan_chunks(left, chunk_size=2, pad_to_multiple_of=4)] == [slice(0, 6), slice(2, 6)]
    whole = plan_chunks(mask, chunk_size=None)
    assert len(whole) == 1 and whole[0].rows.tolist() == [0, 1, 2, 3]
    features = {"input_ids": torch.arange(24).view(4, 6), "attention_mask": mask}
    part = gradcache.chunk_features(features, chunks[1])
    assert part["input_ids"].tolist() == [[0, 1], [18, 19]]


def test_gradcache_gradients_equal_uncached_with_dropout_hard_negatives_and_matryoshka():
    loss_plain, plain = step_grads(grad_cache=False)
    loss_cached, cached = step_grads(grad_cache=True)
    assert abs(loss_cached - loss_plain) <= 1e-6 * abs(loss_plain)
    assert_grads_close(cached, plain, GRAD_RTOL)
    # The equality is not trivial: dropout is on (another seed gives other gradients)...
    _, other_seed = step_grads(grad_cache=False, seed=2)
    with pytest.raises(AssertionError):
        assert_grads_close(other_seed, plain, 1e-2)


def test_gradcache_with_translation_groups_equals_uncached_with_groups():
    """The group ids reach the loss on the cached path too (it runs on the embedding leaves)."""
    grouped = multiparallel_batch()
    loss_plain, plain = step_grads(grad_cache=False, batch=grouped)
    loss_cached, cached = step_grads(grad_cache=True, batch=grouped)
    assert abs(loss_cached - loss_plain) <= 1e-6 * abs(loss_plain)
    assert_grads_close(cached, plain, GRAD_RTOL)
    loss_ungrouped, _ = step_grads(grad_cache=True, batch=dataclasses.replace(grouped, groups=None,
                                                                              negative_groups=None))
    assert loss_ungrouped > loss_cached + 1e-3


def test_gradcache_needs_the_rng_replay_for_dropout(monkeypatch):
    _, plain = step_grads(grad_cache=False)
    monkeypatch.setattr(gradcache.RngState, "replay", lambda self: nullcontext())
    _, unreplayed = step_grads(grad_cache=True)
    with pytest.raises(AssertionError):
        assert_grads_close(unreplayed, plain, 1e-2)


def test_gradcache_on_a_left_padded_decoder():
    model = build_tiny_embedder("qwen2", padding_side="left")
    assert model.tokenizer.padding_side == "left"
    _, plain = step_grads(grad_cache=False, arch="qwen2", chunk_size=None, train=False)
    _, cached = step_grads(grad_cache=True, arch="qwen2", chunk_size=2, train=False)
    assert_grads_close(cached, plain, GRAD_RTOL)


def _two_worker_gradcache(rank: int, world: int, out_path: str) -> None:
    half = shard(ntrex_batch(8, negatives=2), rank, world)
    results = {
        # Eval mode: comparable to one process on the full batch.
        "cached_eval": step_grads(True, train=False, batch=half, world=world),
        # Train mode, same per-rank seed: cached and uncached see the same dropout masks.
        "cached_train": step_grads(True, seed=10 + rank, batch=half, world=world),
        "plain_train": step_grads(False, seed=10 + rank, batch=half, world=world),
    }
    if rank == 0:
        torch.save(results, out_path)


def test_two_worker_gradcache_equals_single_process_and_uncached(tmp_path):
    out = tmp_path / "gc.pt"
    launch_local(_two_worker_gradcache, 2, str(out))
    results = torch.load(out)
    loss, grads = step_grads(False, train=False, chunk_size=None)
    assert abs(results["cached_eval"][0] - loss) <= 1e-5 * abs(loss)
    assert_grads_close(results["cached_eval"][1], grads, GRAD_RTOL)
    assert_grads_close(results["cached_train"][1], results["plain_train"][1], GRAD_RTOL)


def _deepspeed_worker(rank: int, world: int, out_path: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.init_distributed(dist_backend="gloo")
    updates = {}
    for stage in (0, 1, 2, 3):
        model = build_tiny_embedder("xlm-roberta", seed=0).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                  "managed_gradient_accumulation": False, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=config)
        step = ContrastiveStep(engine.module, full_loss(), chunk_size=3, grad_cache=True,
                               max_query_length=48, max_passage_length=48, forward_fn=engine)
        torch.manual_seed(1)
        step.run(ntrex_batch(8, negatives=2), backward_fn=engine.backward)
        engine.step()
        after = {n: (safe_get_full_fp32_param(p) if stage else p).detach() for n, p in engine.module.named_parameters()}
        updates[stage] = {n: before[n] - after[n] for n in before}  # = lr x gradient
    torch.save(updates, out_path)


@pytest.mark.slow
def test_gradcache_under_deepspeed_zero_stages_matches_plain_step(tmp_path):
    """One engine.backward per chunk, boundary left to engine.step() (managed_gradient_accumulation=false),
    forwards through the engine (ZeRO-3 switches its gradient partitions to accumulation there)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds.pt"
    launch_local(_deepspeed_worker, 1, str(out))
    _, grads = step_grads(grad_cache=False)
    updates = torch.load(out)
    assert sorted(updates) == [0, 1, 2, 3]
    for update in updates.values():
        assert_grads_close(update, grads, GRAD_RTOL)
