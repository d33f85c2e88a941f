"""Contrastive losses: reference formulas, false-negative masking, Matryoshka, and the 2-worker gather.

The distributed test spawns two gloo processes on 127.0.0.1, each embedding half of a batch with
the same tiny model; the averaged loss and the averaged parameter gradients (what DDP / DeepSpeed
apply) must equal those of one process on the full batch, also with translation groups that span
both halves (the group ids are gathered with the embeddings). Tolerance: relative error of 1e-5 on
the whole gradient and 1e-3 per tensor (float32; the halves are padded to different widths, so
matmuls block differently and agree only to rounding).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from babelforge.models.tiny import build_tiny_embedder
from babelforge.resources import ntrex_file
from babelforge.train.batching import ContrastiveBatch
from babelforge.train.distributed import launch_local
from babelforge.train.losses import NO_GROUP, InfoNCELoss, MatryoshkaLoss, false_negative_mask, group_id
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


def _reference_grouped(q, p, n, groups, tau, bidirectional=False, same_side=False):
    """The joint partition function written out candidate by candidate, leaving out every candidate
    of the query's translation group but its positive (``groups``: ``[B, 1 + N]``, -1 = none)."""
    q, p, n = (F.normalize(t, dim=-1) for t in (q, p, n))
    batch, per_query = n.shape[:2]
    pair, negative = groups[:, 0].tolist(), groups[:, 1:].tolist()
    losses = []
    for i in range(batch):
        def kept(group: int) -> bool:
            return pair[i] < 0 or group != pair[i]

        logits = [q[i] @ p[j] for j in range(batch) if j == i or kept(pair[j])]
        logits += [q[i] @ n[j, k] for j in range(batch) for k in range(per_query) if kept(negative[j][k])]
        if bidirectional:
            logits += [p[i] @ q[j] for j in range(batch) if j == i or kept(pair[j])]
        if same_side:
            logits += [q[i] @ q[j] for j in range(batch) if j != i and kept(pair[j])]
            logits += [p[i] @ p[j] for j in range(batch) if j != i and kept(pair[j])]
            logits += [p[i] @ n[j, k] for j in range(batch) if j != i for k in range(per_query)
                       if kept(negative[j][k])]
        losses.append(torch.logsumexp(torch.stack(logits) / tau, 0) - q[i] @ p[i] / tau)
    return torch.stack(losses).mean()


def _groups(names: list[list[str | None]]) -> torch.Tensor:
    return torch.tensor([[group_id(g) for g in row] for row in names])


# Six pairs: 0 and 4 are translations of one line, so are 2 and 5 (group "b"); 3 has no group. Row 1's
# first hard negative is a topped-up positive of a row of group "b" (a translation of pair 2's and 5's
# texts); row 3's second one is in group "a".
GROUP_NAMES = [["a", None, None], ["c", "b", None], ["b", None, None], [None, None, "a"], ["a", "d", None],
               ["b", None, None]]


def test_translation_groups_leave_the_partition_function_exactly():
    q, p, n = _embeddings()
    groups = _groups(GROUP_NAMES)
    tau = 0.05
    # By hand, in-batch only: cross-entropy over the similarity matrix without the other rows of one's group.
    sims = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / tau
    hidden = torch.zeros(6, 6, dtype=torch.bool)
    hidden[0, 4] = hidden[4, 0] = hidden[2, 5] = hidden[5, 2] = True
    by_hand = F.cross_entropy(sims.masked_fill(hidden, float("-inf")), torch.arange(6))
    masked, terms = InfoNCELoss(tau).forward_with_terms(q, p, groups=groups[:, 0])
    assert torch.allclose(masked, by_hand, rtol=1e-6)
    assert math.isclose(float(terms["masked_group_negatives"]), 4 / 6, rel_tol=1e-6)   # 4 entries, 6 queries
    assert not torch.allclose(masked, InfoNCELoss(tau)(q, p))
    # Every term, hard negatives with their own groups, and the margin rule on top.
    for options in (dict(), dict(bidirectional=True, same_side=True)):
        loss = InfoNCELoss(tau, **options)
        got = loss(q, p, n, groups)
        assert torch.allclose(got, _reference_grouped(q, p, n, groups, tau, **options), rtol=1e-5), options
        assert not torch.allclose(got, loss(q, p, n))
        with_margin = InfoNCELoss(tau, false_negative_margin=-0.2, **options).forward_with_terms(q, p, n, groups)[1]
        assert with_margin["masked_group_negatives"] == loss.forward_with_terms(q, p, n, groups)[1][
            "masked_group_negatives"]   # counted once, by the exact rule
    # Gradients too: the reference never builds the masked logits, so nothing may flow through them.
    leaves = [t.clone().requires_grad_() for t in (q, p, n)]
    InfoNCELoss(tau, bidirectional=True, same_side=True)(*leaves, groups).backward()
    reference = [t.clone().requires_grad_() for t in (q, p, n)]
    _reference_grouped(*reference, groups, tau, bidirectional=True, same_side=True).backward()
    for got, expected in zip(leaves, reference):
        assert torch.allclose(got.grad, expected.grad, rtol=1e-4, atol=1e-6)


def test_without_groups_or_with_ungrouped_texts_the_loss_is_unchanged_bit_for_bit():
    q, p, n = _embeddings()
    none = torch.full((6, 3), NO_GROUP)
    distinct = torch.arange(18).view(6, 3)
    for options in (dict(), dict(bidirectional=True, same_side=True, false_negative_margin=0.0)):
        plain = InfoNCELoss(0.05, **options)(q, p, n)
        assert torch.equal(InfoNCELoss(0.05, **options)(q, p, n, None), plain)
        assert torch.equal(InfoNCELoss(0.05, **options)(q, p, n, none), plain)
        assert torch.equal(InfoNCELoss(0.05, **options)(q, p, n, distinct), plain)
    # [B] groups are the pairs' groups with ungrouped negatives.
    groups = _groups(GROUP_NAMES)
    pairs_only = torch.cat([groups[:, :1], torch.full((6, 2), NO_GROUP)], dim=1)
    assert torch.equal(InfoNCELoss(0.05)(q, p, n, groups[:, 0]), InfoNCELoss(0.05)(q, p, n, pairs_only))
    with pytest.raises(ValueError, match=r"groups must be \[B=6\] or \[B, 1 \+ N=3\]"):
        InfoNCELoss(0.05)(q, p, n, groups[:, :2])


def test_matryoshka_passes_groups_to_every_dimension():
    q, p, n = _embeddings(dim=32)
    groups = _groups(GROUP_NAMES)
    loss, terms = MatryoshkaLoss(InfoNCELoss(0.05), dims=[32, 8]).forward_with_terms(q, p, n, groups)
    for d in (32, 8):
        assert torch.allclose(terms[f"loss@{d}"], _reference_grouped(q[:, :d], p[:, :d], n[..., :d], groups, 0.05),
                              rtol=1e-5)
        assert float(terms[f"masked_group_negatives@{d}"]) > 0
    assert torch.allclose(loss, terms["loss@32"] + terms["loss@8"])


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
GROUPED_CONFIGS = {  # on multiparallel_batch, whose translation groups span both workers' halves
    "groups": dict(),
    "groups_gte": dict(bidirectional=True, same_side=True),
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


def multiparallel_batch(negatives: int = 2) -> ContrastiveBatch:
    """8 NTREX rows as multi-parallel bitext makes them: en->de of lines 0-5, then de->en of lines 0 and 2.

    Rows 0 and 6, and rows 2 and 7, are translations of one line (one group each), split across the
    halves of a 2-worker shard. Row 3's first hard negative is a topped-up positive of a line-1 row
    (German line 1: row 1's positive, word for word); the other negatives are lines 500+.
    """
    en = ntrex_file("en").read_text(encoding="utf-8").splitlines()
    de = ntrex_file("de").read_text(encoding="utf-8").splitlines()
    lines = [0, 1, 2, 3, 4, 5, 0, 2]
    forward = [k < 6 for k in range(8)]
    batch = ntrex_batch(8, negatives)
    negative_lines = [[i + 500 + k for k in range(negatives)] for i in range(8)]
    negative_lines[3][0] = 1
    return dataclasses.replace(
        batch, queries=[(en if f else de)[i] for i, f in zip(lines, forward)],
        positives=[(de if f else en)[i] for i, f in zip(lines, forward)],
        negatives=[[de[j] for j in row] for row in negative_lines],
        query_langs=["en" if f else "de" for f in forward], positive_langs=["de" if f else "en" for f in forward],
        groups=[f"ntrex:{i}" for i in lines], negative_groups=[[f"ntrex:{j}" for j in row] for row in negative_lines])


def shard(batch: ContrastiveBatch, rank: int, world: int) -> ContrastiveBatch:
    """Contiguous shards: rank-major order is the order the gather concatenates in."""
    n = len(batch) // world
    pick = slice(rank * n, (rank + 1) * n)
    per_row = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name not in ("step", "task")}
    return dataclasses.replace(batch, **{name: None if value is None else value[pick]
                                         for name, value in per_row.items()})


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
    full, grouped = ntrex_batch(8, negatives=2), multiparallel_batch()
    results = {name: loss_and_grads(shard(full, rank, world), cfg) for name, cfg in LOSS_CONFIGS.items()}
    results.update({name: loss_and_grads(shard(grouped, rank, world), cfg) for name, cfg in GROUPED_CONFIGS.items()})
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
    grouped = multiparallel_batch()
    for name, config in GROUPED_CONFIGS.items():
        loss, grads = loss_and_grads(grouped, config)
        dist_loss, dist_grads = distributed[name]
        assert math.isclose(dist_loss, loss, rel_tol=1e-5), name
        assert_grads_close(dist_grads, grads, GRAD_RTOL)
        # The groups did something: without them, the translations across the halves are negatives.
        ungrouped = loss_and_grads(dataclasses.replace(grouped, groups=None, negative_groups=None), config)[0]
        assert ungrouped > loss + 1e-3, name
    # Without the gather each worker only sees its own passages: a different (larger-batch-blind) loss.
    half_only = [loss_and_grads(shard(full, r, 2), dict(gather=False))[0] for r in range(2)]
    assert abs(sum(half_only) / 2 - distributed["in_batch+hard"][0]) > 1e-3
