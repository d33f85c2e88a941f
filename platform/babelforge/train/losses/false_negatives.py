"""Masking of likely false negatives among contrastive candidates.

Large in-batch pools and mined hard negatives contain passages that actually answer the query
(duplicates, paraphrases, other relevant documents). Pushing them away hurts. Following the
positive-aware filtering of NV-Retriever (Moreira et al. 2024, "NV-Retriever: Improving text
embedding models with effective hard-negative mining", arXiv 2407.15831), GISTEmbed (Solatorio 2024,
arXiv 2402.16829) and Arctic-Embed (Merrick et al. 2024, arXiv 2405.05374), a candidate whose
similarity to the query exceeds the positive's similarity by more than ``margin`` is treated as a
false negative and dropped from the softmax denominator. The decision is made on detached scores,
so the mask itself carries no gradient::

    >>> import torch
    >>> sims = torch.tensor([[0.5, 0.9, 0.55, 0.1]])       # the positive is column 0
    >>> is_positive = torch.tensor([[True, False, False, False]])
    >>> false_negative_mask(sims, sims[:, 0], is_positive, margin=0.1).tolist()
    [[False, True, False, False]]
"""

from __future__ import annotations

import torch

__all__ = ["false_negative_mask"]


def false_negative_mask(similarities: torch.Tensor, positive_similarities: torch.Tensor,
                        is_positive: torch.Tensor, margin: float) -> torch.Tensor:
    """``True`` where a non-positive candidate scores above its row's positive by more than ``margin``.

    ``similarities`` is ``[rows, candidates]`` (cosine, before the temperature),
    ``positive_similarities`` is ``[rows]``, ``is_positive`` marks the entries that are the row's
    positive pair (never masked). A negative ``margin`` masks more aggressively (candidates close
    to, but below, the positive).
    """
    threshold = positive_similarities.detach().unsqueeze(1) + margin
    return (similarities.detach() > threshold) & ~is_positive
