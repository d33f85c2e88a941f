"""The interface every training loss implements: embeddings in, a scalar (plus named terms) out.

Losses see embeddings, never the model. That keeps them pure tensor code, lets
:class:`~babelforge.train.step.ContrastiveStep` embed however it likes (one pass, length-sorted
chunks, or GradCache's two passes) and lets wrappers such as
:class:`~babelforge.train.losses.matryoshka.MatryoshkaLoss` compose with any loss.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbeddingLoss"]


class EmbeddingLoss(nn.Module):
    """Base class: implement :meth:`forward_with_terms`; ``forward`` returns just the loss.

    Inputs are ``queries [B, D]``, ``positives [B, D]`` (row ``i`` is the positive of query ``i``),
    optionally ``negatives [B, N, D]`` (hard negatives of each query) and optionally ``groups``,
    the int64 translation-group ids of the texts (:mod:`~babelforge.train.losses.groups`): ``[B]``
    for each pair (its query and positive), or ``[B, 1 + N]`` with the pair's group in column 0 and
    hard negative ``k``'s group in column ``1 + k``; negative ids mean "no group". Losses that do
    not use groups ignore them. The terms are detached scalars for logging (per-dimension losses,
    masked false negatives...).
    """

    def forward(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_terms(queries, positives, negatives, groups)[0]

    def forward_with_terms(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
