"""Contrastive losses: reference formulas, false-negative masking, Matryoshka, and the 2-worker gather.

The distributed test spawns two gloo processes on 127.0.0.1, each embedding half of a batch with
the same tiny model; the averaged loss and the averaged parameter gradients (what DDP / DeepSpeed
apply) must equal those of one process on the full batch. Tolerance: relative error of 1e-5 on
the whole gradient and 1e-3 per tensor (float32; the halves are padded to different widths, so
matmuls block differently and agree only to rounding).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from babelforge.models.tiny import build_tiny_embedder
from babelforge.resources import ntrex_file
from babelforge.train.batching import ContrastiveBatch
from babelforge.train.distributed import launch_local
from babelforge.train.losses import InfoNCELoss, MatryoshkaLoss, false_negative_mask
from babelforge.train.step import ContrastiveStep

GRAD_RTOL = 1e-5


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads spinning against other jobs make tiny
    models ~10x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _embeddings(batch=6, negatives=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=gen)
    p = q + 1.5 * torch.randn(batch, dim, generator=gen)
    n = torch.randn(batch, negatives, dim, generator=gen) + 0.5 * q.unsqueeze(1)
    return q, p, n


def _reference_info_nce(q, p, n, temperature):
    """The textbook formula, one query at a time: softmax over all positives and all negatives."""
    q, p, n = (F.normalize(t, dim=-1) for t in (q, p, n))
    docs = torch.cat([p, n.reshape(-1, q.shape[1])])
    losses = []
    for i in range(q.shape[0]):
        logits = docs @ q[i] / temperature
        losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def test_info_nce_matches_the_per_query_formula_with_hard_negatives():
    q, p, n = _embeddings()
    for temperature in (0.02, 0.1):
        got = InfoNCELoss(temperature)(q, p, n)
        assert torch.allclose(got, _reference_info_nce(q, p, n, temperature), rtol=1e-5)
    # In-batch only: cross-entropy over the query-passage similarity matrix.
    logits = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / 0.05
    assert torch.allclose(InfoNCELoss(0.05)(q, p), F.cross_entropy(logits, torch.arange(len(q))), rtol=1e-5)


@pytest.mark.parametrize("bidirectional,same_side,directions", [
    (True, False, ("query_to_doc", "doc_to_query")),
    (True, True, ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
])
def test_gte_terms_match_sentence_transformers(bidirectional, same_side, directions):
    """GTE's improved contrastive loss, cross-checked against sentence-transformers' joint-partition MNRL."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p, n = _embeddings()
    ours = InfoNCELoss(0.05, bidirectional=bidirectional, same_side=same_side)(q, p, n)
    theirs = MultipleNegativesRankingLoss(None, scale=20.0, directions=directions, partition_mode="joint")
    expected = theirs.compute_loss_from_embeddings([q, p, *n.unbind(1)], labels=None)
    assert torch.allclose(ours, expected, rtol=1e-5)
    assert ours > InfoNCELoss(0.05)(q, p, n)  # more terms in the partition function


def test_false_negative_in_batch_is_masked_and_loss_drops_accordingly():
    # Query 0's positive sits at cosine 0.6; query 1's positive is at 0.9 from query 0 (a duplicate
    # answer: a false negative for query 0). Everything else is orthogonal.
    e = torch.eye(4)
    q = torch.stack([e[0], e[2]])
    p = torch.stack([0.6 * e[0] + 0.8 * e[1], 0.9 * e[0] + math.sqrt(1 - 0.81) * e[2]])
    tau = 0.1

    sims = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    assert false_negative_mask(sims, sims.diagonal(), torch.eye(2, dtype=torch.bool), margin=0.1).tolist() == \
        [[False, True], [False, False]]

    unmasked = InfoNCELoss(tau)(q, p)
    masked_loss = InfoNCELoss(tau, false_negative_margin=0.1)
    masked, terms = masked_loss.forward_with_terms(q, p)
    # Query 0 now only has its positive in the partition function: its loss term is exactly 0.
    loss_q1 = -(sims[1, 1] / tau - torch.logsumexp(sims[1] / tau, 0))
    assert torch.allclose(masked, loss_q1 / 2, atol=1e-6)
    assert float(terms["masked_false_negatives"]) == 0.5  # one masked candidate over two queries
    assert masked < unmasked
    # A margin the candidate does not clear leaves the loss unchanged.
    assert torch.allclose(InfoNCELoss(tau, false_negative_margin=0.35)(q, p), unmasked)

    # No gradient reaches the masked candidate through query 0's term.
    p_leaf = p.clone().requires_grad_()
    InfoNCELoss(tau, false_negative_margin=0.1)(q[:1], p_leaf[:1]).backward()
    assert torch.count_nonzero(p_leaf.grad[1]) == 0


def test_matryoshka_is_the_weighted_sum_over_truncated_embeddings():
    q, p, n = _embeddings(dim=32)
    inner = InfoNCELoss(0.05, false_negative_margin=0.0)
    loss, terms = MatryoshkaLoss(inner, dims=[32, 16, 4], weights=[1.0, 0.5, 0.25]).forward_with_terms(q, p, n)
    expected = {d: _reference_info_nce(q[:, :d], p[:, :d], n[..., :d], 0.05) for d in (32, 16, 4)}
    for d in (32, 16, 4):
        assert torch.allclose(terms[f"loss@{d}"], inner(q[:, :d], p[:, :d], n[..., :d]))
        assert f"masked_false_negatives@{d}" in terms
    assert torch.allclose(loss, terms["loss@32"] + 0.5 * terms["loss@16"] + 0.25 * terms["loss@4"])
    # Without masking, the per-dimension terms are the textbook InfoNCE of the truncated vectors.
    plain = MatryoshkaLoss(InfoNCELoss(0.05), dims=[32, 16, 4]).forward_with_terms(q, p, n)[1]
    for d in (32, 16, 4):
        assert torch.allclose(plain[f"loss@{d}"], expected[d], rtol=1e-5)


def test_losses_reject_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)
    with pytest.raises(ValueError, match="exceeds the embedding size 16"):
        MatryoshkaLoss(InfoNCELoss(), dims=[32])(torch.randn(2, 16), torch.randn(2, 16))
    with pytest.raises(ValueError, match="weights"):
        MatryoshkaLoss(InfoNCELoss(), dims=[8, 4], weights=[1.0])
    with pytest.raises(ValueError, match="negatives must be"):
        InfoNCELoss()(torch.randn(2, 8), torch.randn(2, 8), torch.randn(3, 1, 8))


# ----------------------------------------------------------------------------- 2 workers == 1 process
LOSS_CONFIGS = {
    "in_batch+hard": dict(),
    "gte_bidirectional_same_side": dict(bidirectional=True, same_side=True),
    "false_negative_margin": dict(false_negative_margin=-0.05),
}


def ntrex_batch(size: int, negatives: int, offset: int = 0) -> ContrastiveBatch:
    en = ntrex_file("en").read_text(encoding="utf-8").splitlines()
    de = ntrex_file("de").read_text(encoding="utf-8").splitlines()
    rows = range(offset, offset + size)
    return ContrastiveBatch(
        step=0, task="bitext", ids=[str(i) for i in rows], queries=[en[i] for i in rows],
        positives=[de[i] for i in rows], negatives=[[de[i + 500 + k] for k in range(negatives)] for i in rows],
        query_prompts=["query: "] * size, passage_prompts=["passage: "] * size,
        query_langs=["en"] * size, positive_langs=["de"] * size)


def shard(batch: ContrastiveBatch, rank: int, world: int) -> ContrastiveBatch:
    """Contiguous shards: rank-major order is the order the gather concatenates in."""
    n = len(batch) // world
    pick = slice(rank * n, (rank + 1) * n)
    return ContrastiveBatch(batch.step, batch.task, batch.ids[pick], batch.queries[pick], batch.positives[pick],
                            batch.negatives[pick], batch.query_prompts[pick], batch.passage_prompts[pick],
                            batch.query_langs[pick], batch.positive_langs[pick])


def loss_and_grads(batch: ContrastiveBatch, config: dict, **step_options) -> tuple[float, dict[str, torch.Tensor]]:
    """One eval-mode step of a fresh seed-0 tiny model; grads averaged over workers like DDP does."""
    model = build_tiny_embedder("xlm-roberta", seed=0)
    step = ContrastiveStep(model, InfoNCELoss(0.05, **config), max_query_length=48, max_passage_length=48,
                           **step_options)
    loss = torch.tensor(step.run(batch).loss)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        torch.distributed.all_reduce(loss)
    grads = {}
    for name, param in model.named_parameters():
        if world > 1:
            torch.distributed.all_reduce(param.grad)
        grads[name] = param.grad / world
    return float(loss) / world, grads


def _gathered_worker(rank: int, world: int, out_path: str) -> None:
    full = ntrex_batch(8, negatives=2)
    results = {name: loss_and_grads(shard(full, rank, world), cfg) for name, cfg in LOSS_CONFIGS.items()}
    if rank == 0:
        torch.save(results, out_path)


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    """Whole-model relative error <= ``rtol``; each tensor within 100 x ``rtol`` of its own norm.

    Tensors whose true gradient is structurally zero (attention key biases: softmax ignores them)
    hold only rounding noise and are compared to the model's gradient norm instead.
    """
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    diff = torch.cat([(got[name] - g).flatten() for name, g in expected.items()]).norm()
    assert diff <= rtol * total, f"relative gradient error {float(diff / total):.2e} > {rtol:.0e}"
    for name, g in expected.items():
        err = (got[name] - g).norm()
        assert err <= 100 * rtol * max(g.norm(), 1e-3 * total), f"{name}: gradient error {float(err):.2e}"


def test_two_worker_gathered_loss_and_grads_equal_single_process_full_batch(tmp_path):
    out = tmp_path / "dist.pt"
    launch_local(_gathered_worker, 2, str(out))
    distributed = torch.load(out)
    full = ntrex_batch(8, negatives=2)
    for name, config in LOSS_CONFIGS.items():
        loss, grads = loss_and_grads(full, config)
        dist_loss, dist_grads = distributed[name]
        assert math.isclose(dist_loss, loss, rel_tol=1e-5), name
        assert_grads_close(dist_grads, grads, GRAD_RTOL)
    # Without the gather each worker only sees its own passages: a different (larger-batch-blind) loss.
    half_only = [loss_and_grads(shard(full, r, 2), dict(gather=False))[0] for r in range(2)]
    assert abs(sum(half_only) / 2 - distributed["in_batch+hard"][0]) > 1e-3
