"""Matryoshka representation learning: one loss applied to nested prefixes of the embedding.

Kusupati et al. 2022 ("Matryoshka Representation Learning", arXiv 2205.13147) train the first
``d`` components of an embedding to be a good embedding on their own, for a ladder of ``d``, by
summing the loss over the truncated (and re-normalised) embeddings::

    L = Σ_d w_d · L_inner(q[:, :d], d⁺[:, :d], d⁻[:, :, :d])

Arctic-Embed 2.0 (Yu et al. 2024, arXiv 2412.04506) applies it in both pre-training and
fine-tuning of a multilingual retriever, which is what babelforge does. The inner loss normalises
(cosine similarity), so truncating is all that is needed here; the model is embedded once and
only the loss is evaluated per dimension.

Example::

    >>> import torch
    >>> from babelforge.train.losses.info_nce import InfoNCELoss
    >>> torch.manual_seed(0) and None
    >>> q, d = torch.randn(4, 32), torch.randn(4, 32)
    >>> mrl = MatryoshkaLoss(InfoNCELoss(), dims=[32, 16, 8], weights=[1.0, 1.0, 0.5])
    >>> loss, terms = mrl.forward_with_terms(q, d)
    >>> sorted(terms)
    ['loss@16', 'loss@32', 'loss@8']
    >>> torch.allclose(loss, terms["loss@32"] + terms["loss@16"] + 0.5 * terms["loss@8"])
    True
"""

from __future__ import annotations

from typing import Sequence

import torch

from babelforge.train.losses.base import EmbeddingLoss

__all__ = ["MatryoshkaLoss"]


class MatryoshkaLoss(EmbeddingLoss):
    """Weighted sum of ``loss`` over embeddings truncated to each of ``dims``.

    ``dims`` should include the full embedding size (the served default). ``weights`` default to
    1 for every dimension. Terms are the unweighted per-dimension losses, named ``loss@<dim>``,
    plus the inner loss's own terms suffixed the same way. ``groups`` (translation groups) go to
    the inner loss unchanged: they name texts, whatever the dimension.
    """

    def __init__(self, loss: EmbeddingLoss, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not dims:
            raise ValueError("dims: need at least one Matryoshka dimension")
        if any(int(d) <= 0 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct positive integers, got {list(dims)}")
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"weights: got {len(weights)} for {len(dims)} dims")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights]

    def forward_with_terms(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        full = queries.shape[-1]
        if max(self.dims) > full:
            raise ValueError(f"Matryoshka dimension {max(self.dims)} exceeds the embedding size {full}")
        total = queries.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for dim, weight in zip(self.dims, self.weights):
            loss, inner = self.loss.forward_with_terms(
                queries[..., :dim], positives[..., :dim], None if negatives is None else negatives[..., :dim], groups)
            total = total + weight * loss
            terms[f"loss@{dim}"] = loss.detach()
            terms.update({f"{name}@{dim}": value for name, value in inner.items()})
        return total, terms
