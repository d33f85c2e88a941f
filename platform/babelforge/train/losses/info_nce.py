"""InfoNCE with in-batch and hard negatives, gathered across workers, with GTE's extra terms.

The contrastive objective of van den Oord et al. 2018 ("Representation Learning with Contrastive
Predictive Coding", arXiv 1807.03748) as used for retrieval by DPR (Karpukhin et al. 2020,
arXiv 2004.04906) and E5 (Wang et al. 2022, arXiv 2212.03533): for query ``q_i`` with positive
``d_i``, every other passage of the batch (the other queries' positives and everyone's hard
negatives) is a negative::

    L_i = -log( exp(s(q_i, d_i)/τ) / Z_i ),   Z_i = Σ_j exp(s(q_i, d_j)/τ)

with ``s`` the cosine similarity and ``τ`` the temperature. Options:

- ``gather=True``: the candidates are the passages (and, for the extra terms, queries) of *all*
  workers, all-gathered with gradients (:func:`~babelforge.train.distributed.gather_with_grad`).
  Each worker's loss is the mean over its own queries, so the average over workers (what DDP and
  DeepSpeed do to gradients) is the full global-batch mean.
- ``bidirectional=True`` adds ``Σ_j exp(s(q_j, d_i)/τ)`` (the passage choosing among all queries) and
  ``same_side=True`` adds ``Σ_{j≠i} exp(s(q_i, q_j)/τ) + Σ_{j≠i} exp(s(d_i, d_j)/τ)`` (queries
  repelling queries, passages repelling the other pairs' passages) to the *same* partition
  function ``Z_i``: the "improved contrastive loss" of GTE (Li et al. 2023, arXiv 2308.03281).
- ``false_negative_margin``: candidates scoring above the positive by more than the margin leave
  ``Z_i`` (:mod:`~babelforge.train.losses.false_negatives`).
- ``groups`` (an argument, not an option): every candidate of any term that belongs to the query's
  translation group, other than its positive, leaves ``Z_i``
  (:mod:`~babelforge.train.losses.groups`). A pair's query and positive are in the pair's group; a
  hard negative is in its own group (a negative topped up from another row's positive: that row's
  group; a mined one: none, mining never picks a text of the pair's group). With the gather, the
  group ids are gathered alongside the embeddings.

Example::

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> q, d = torch.randn(4, 8), torch.randn(4, 8)
    >>> loss = InfoNCELoss(temperature=0.05)
    >>> float(loss(q, q + 0.01 * d)) < 0.01                    # positives ≈ their queries
    True
    >>> float(InfoNCELoss(temperature=0.05, bidirectional=True, same_side=True)(q, d)) > float(loss(q, d))
    True
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from babelforge.train.distributed import gather_with_grad, rank
from babelforge.train.losses.base import EmbeddingLoss
from babelforge.train.losses.false_negatives import false_negative_mask
from babelforge.train.losses.groups import NO_GROUP, same_group_mask

__all__ = ["InfoNCELoss"]


class InfoNCELoss(EmbeddingLoss):
    """Temperature-scaled cross-entropy of each query over its positive and all candidates.

    Args:
        temperature: ``τ``; 0.01–0.05 is usual for cosine similarity (E5: 0.01, GTE: 0.01).
        bidirectional: add the passage→query term (GTE).
        same_side: add query→query and passage→passage terms (GTE).
        false_negative_margin: mask candidates with ``s > s_pos + margin``; ``None`` disables.
        gather: use every worker's embeddings as candidates (no-op when not distributed).
    """

    def __init__(self, temperature: float = 0.05, *, bidirectional: bool = False, same_side: bool = False,
                 false_negative_margin: float | None = None, gather: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.bidirectional = bidirectional
        self.same_side = same_side
        self.false_negative_margin = false_negative_margin
        self.gather = gather

    def forward_with_terms(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if queries.shape != positives.shape or queries.dim() != 2:
            raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} "
                             "must both be [B, D]")
        batch, dim = queries.shape
        per_query = 0 if negatives is None else negatives.shape[1]
        if negatives is not None and (negatives.dim() != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim):
            raise ValueError(f"negatives must be [B={batch}, N, D={dim}], got {tuple(negatives.shape)}")

        # Similarities in float32 whatever the model's precision (bf16 logits lose the ranking).
        q = F.normalize(queries.float(), dim=-1)
        p = F.normalize(positives.float(), dim=-1)
        gather = gather_with_grad if self.gather else (lambda t: t)
        all_q, all_p = gather(q), gather(p)
        candidates = [all_p]
        if negatives is not None:
            candidates.append(gather(F.normalize(negatives.float(), dim=-1).reshape(batch * per_query, dim)))
        docs = torch.cat(candidates)
        global_batch = all_q.shape[0]
        offset = rank() * batch if global_batch > batch else 0
        rows = torch.arange(batch, device=q.device)
        own = rows + offset  # column of each local pair among the gathered queries / positives

        # Blocks of one joint partition function: (similarities, entries to exclude, positive entries,
        # whether the candidates are the passages or the queries). Positives come first among the
        # passages, so column ``own`` is the pair in both layouts.
        pair_d = torch.zeros(batch, docs.shape[0], dtype=torch.bool, device=q.device)
        pair_d[rows, own] = True
        pair_q = pair_d[:, :global_batch]
        none_d, none_q = torch.zeros_like(pair_d), torch.zeros_like(pair_q)
        blocks = [(q @ docs.T, none_d, pair_d, True)]
        if self.bidirectional:
            blocks.append((p @ all_q.T, none_q, pair_q, False))
        if self.same_side:
            blocks.append((q @ all_q.T, pair_q, none_q, False))  # a query is not its own negative
            own_pair = pair_d.clone()  # nor are a passage's own pair (its positive and hard negatives)
            if per_query:
                hard = global_batch + own.unsqueeze(1) * per_query + torch.arange(per_query, device=q.device)
                own_pair[rows.unsqueeze(1), hard] = True
            blocks.append((p @ docs.T, own_pair, none_d, True))
        sims = torch.cat([b[0] for b in blocks], dim=1)
        excluded = torch.cat([b[1] for b in blocks], dim=1)
        is_positive = torch.cat([b[2] for b in blocks], dim=1)

        positive_sims = sims[rows, own]
        terms: dict[str, torch.Tensor] = {}
        if groups is not None:
            pair_groups, doc_groups = self._gathered_groups(groups, batch, per_query, gather)
            columns = torch.cat([doc_groups if of_docs else pair_groups for *_, of_docs in blocks])
            same = same_group_mask(pair_groups[own], columns, is_positive) & ~excluded
            excluded = excluded | same
            terms["masked_group_negatives"] = same.sum(dim=1).float().mean().detach()
        if self.false_negative_margin is not None:
            masked = false_negative_mask(sims, positive_sims, is_positive, self.false_negative_margin) & ~excluded
            excluded = excluded | masked
            terms["masked_false_negatives"] = masked.sum(dim=1).float().mean().detach()
        logits = (sims / self.temperature).masked_fill(excluded, float("-inf"))
        loss = (torch.logsumexp(logits, dim=1) - positive_sims / self.temperature).mean()
        return loss, terms

    @staticmethod
    def _gathered_groups(groups: torch.Tensor, batch: int, per_query: int,
                         gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Group ids of all workers' pairs ``[W·B]`` and passages ``[W·B + W·B·N]`` (the ``docs`` order)."""
        if groups.dim() == 1:
            groups = torch.cat([groups.unsqueeze(1), groups.new_full((len(groups), per_query), NO_GROUP)], dim=1)
        if groups.shape != (batch, 1 + per_query):
            raise ValueError(f"groups must be [B={batch}] or [B, 1 + N={1 + per_query}], got {tuple(groups.shape)}")
        all_groups = gather(groups.long())  # ids carry no gradient: the gather is a plain all-gather here
        return all_groups[:, 0], torch.cat([all_groups[:, 0], all_groups[:, 1:].reshape(-1)])
