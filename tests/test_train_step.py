"""ContrastiveStep: metrics, chunked == unchunked, bf16 autocast, translation groups, and Matryoshka training
that works."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from babelforge.models.tiny import build_tiny_embedder
from babelforge.resources import ntrex_file
from babelforge.train import (BatchingConfig, ContrastiveBatcher, ContrastiveStep, InfoNCELoss, MatryoshkaLoss,
                              TokenizedBatch)
from test_losses import GRAD_RTOL, assert_grads_close, multiparallel_batch, ntrex_batch, single_thread  # noqa: F401


def run_step(batch, **options):
    model = build_tiny_embedder("xlm-roberta", seed=0).eval()
    step = ContrastiveStep(model, InfoNCELoss(0.05), max_query_length=48, max_passage_length=48, **options)
    metrics = step.run(batch)
    return metrics, {n: p.grad for n, p in model.named_parameters()}, step


def test_metrics_count_pairs_passages_and_tokens():
    batch = ntrex_batch(8, negatives=2)
    metrics, _, step = run_step(batch, chunk_size=3)
    inputs = step.tokenize(batch)
    assert (metrics.pairs, metrics.passages, metrics.forward_passes) == (8, 24, 1)
    real = int(inputs.queries["attention_mask"].sum() + inputs.passages["attention_mask"].sum())
    full = inputs.queries["attention_mask"].numel() + inputs.passages["attention_mask"].numel()
    assert metrics.tokens == real
    assert real <= metrics.computed_tokens < full  # chunks of similar length drop most padding
    assert metrics.loss > 0 and metrics.seconds > 0
    cached, *_ = run_step(batch, chunk_size=3, grad_cache=True)
    assert cached.forward_passes == 2 and cached.computed_tokens == metrics.computed_tokens


def test_length_sorted_chunks_and_pretokenized_inputs_give_the_one_pass_result():
    batch = ntrex_batch(8, negatives=1)
    one_pass, grads, step = run_step(batch)
    chunked, chunked_grads, _ = run_step(batch, chunk_size=3, pad_to_multiple_of=8)
    assert abs(chunked.loss - one_pass.loss) <= 1e-5 * one_pass.loss
    assert_grads_close(chunked_grads, grads, GRAD_RTOL)
    pretokenized, pre_grads, _ = run_step(step.tokenize(batch))
    assert isinstance(step.tokenize(batch), TokenizedBatch)
    assert pretokenized.loss == one_pass.loss
    assert_grads_close(pre_grads, grads, 0.0)


def test_bf16_autocast_keeps_the_loss_in_float32_and_close():
    batch = ntrex_batch(8, negatives=1)
    fp32, grads, _ = run_step(batch, chunk_size=4)
    bf16, bf16_grads, _ = run_step(batch, chunk_size=4, autocast_dtype=torch.bfloat16)
    assert abs(bf16.loss - fp32.loss) <= 0.05 * fp32.loss
    total = torch.cat([g.flatten() for g in grads.values()])
    diff = torch.cat([(bf16_grads[n] - g).flatten() for n, g in grads.items()])
    assert diff.norm() <= 0.1 * total.norm()


def test_translation_groups_reach_the_loss_and_ungrouped_batches_train_as_before():
    batch = ntrex_batch(8, negatives=2)
    ungrouped = dataclasses.replace(batch, groups=[None] * 8, negative_groups=[[None, None]] * 8)
    without, grads, step = run_step(batch)
    with_none, none_grads, _ = run_step(ungrouped)
    assert step.tokenize(batch).groups is None
    assert step.tokenize(ungrouped).groups.tolist() == [[-1, -1, -1]] * 8
    assert with_none.loss == without.loss and with_none.terms["masked_group_negatives"] == 0.0
    assert all(torch.equal(none_grads[name], g) for name, g in grads.items())   # bit for bit

    grouped = multiparallel_batch()
    ids = step.tokenize(grouped).groups
    assert ids.dtype == torch.int64 and ids.shape == (8, 3)
    assert ids[0, 0] == ids[6, 0] and ids[2, 0] == ids[7, 0] and ids[3, 1] == ids[1, 0] != ids[0, 0]
    metrics, _, _ = run_step(grouped)
    assert metrics.terms["masked_group_negatives"] == 5 / 8   # queries 0, 2, 6, 7: a translation each; 1: a negative
    assert metrics.loss < run_step(dataclasses.replace(grouped, groups=None, negative_groups=None))[0].loss


def test_grad_cache_needs_a_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ContrastiveStep(build_tiny_embedder(), InfoNCELoss(), grad_cache=True)


# ----------------------------------------------------------------------------- Matryoshka training
TRAIN, HELD_OUT = range(0, 1500), range(1697, 1997)
DIMS = [32, 16, 8]


def top1(model, en: list[str], de: list[str], dim: int) -> float:
    """English -> German retrieval accuracy at embedding size ``dim`` over the held-out lines."""
    q = model.encode([en[i] for i in HELD_OUT], prompt="query: ", dim=dim, batch_size=100)
    p = model.encode([de[i] for i in HELD_OUT], prompt="passage: ", dim=dim, batch_size=100)
    return float(((q @ p.T).argmax(axis=1) == np.arange(len(q))).mean())


def train_tiny(loss, en: list[str], de: list[str], steps: int = 150):
    model = build_tiny_embedder("xlm-roberta", seed=0, matryoshka_dims=DIMS[1:])
    rows = [{"id": str(i), "query": en[i], "positive": de[i], "task": "bitext", "query_lang": "en",
             "positive_lang": "de"} for i in TRAIN]
    batcher = ContrastiveBatcher(rows, BatchingConfig(batch_size=32, seed=0))
    step = ContrastiveStep(model, loss, max_query_length=48, max_passage_length=48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    torch.manual_seed(0)
    for k in range(steps):
        epoch, index = divmod(k, batcher.steps_per_epoch)
        step.run(batcher.shard(batcher.plan(epoch)[index], epoch, index))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.slow
def test_matryoshka_training_makes_truncated_embeddings_retrieve():
    en = ntrex_file("en").read_text(encoding="utf-8").splitlines()
    de = ntrex_file("de").read_text(encoding="utf-8").splitlines()
    untrained = build_tiny_embedder("xlm-roberta", seed=0)
    before = {d: top1(untrained, en, de, d) for d in DIMS}
    mrl = train_tiny(MatryoshkaLoss(InfoNCELoss(0.05), dims=DIMS), en, de)
    after = {d: top1(mrl, en, de, d) for d in DIMS}
    # Measured top-1 at 32 / 16 / 8 over 300 held-out lines: untrained 0.12 / 0.06 / 0.02,
    # Matryoshka-trained 0.30 / 0.22 / 0.12, trained with plain InfoNCE 0.31 / 0.19 / 0.08.
    assert after[16] >= before[16] + 0.1, (before, after)
    assert after[8] >= before[8] + 0.06, (before, after)
    # Training the full size alone helps the shortest prefix less: that part is Matryoshka's doing.
    plain = train_tiny(InfoNCELoss(0.05), en, de)
    assert top1(plain, en, de, 8) < after[8]
