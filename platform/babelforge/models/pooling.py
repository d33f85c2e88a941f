"""Pooling of token embeddings into one vector per text, and Matryoshka truncation.

Pure tensor code (no Ray, no model): the same functions serve encoding, training and serving.

Padding may be on either side. ``last_token`` pooling finds the last *attended* position of each
row from the attention mask, so it is correct for right padding (encoders, and decoders in
training) and for left padding (decoders batched for generation)::

    >>> import torch
    >>> h = torch.arange(12.).view(2, 3, 2)            # batch 2, seq 3, dim 2
    >>> right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> pool(h, right, "last_token").tolist()
    [[2.0, 3.0], [10.0, 11.0]]
    >>> left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    >>> pool(h, left, "last_token").tolist()
    [[4.0, 5.0], [10.0, 11.0]]
    >>> pool(h, right, "mean").tolist()
    [[1.0, 2.0], [8.0, 9.0]]
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

PoolingMode = Literal["cls", "mean", "last_token"]
POOLING_MODES: tuple[str, ...] = ("cls", "mean", "last_token")

__all__ = ["PoolingMode", "POOLING_MODES", "pool", "last_token_indices", "first_token_indices",
           "truncate_embeddings", "truncate_embeddings_np"]


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row (works for left and right padding)."""
    seq_len = attention_mask.shape[1]
    flipped_first_one = attention_mask.flip(1).to(torch.int32).argmax(dim=1)
    return (seq_len - 1 - flipped_first_one).long()


def first_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the first position whose mask is 1, per row (0 for right padding)."""
    return attention_mask.to(torch.int32).argmax(dim=1).long()


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``[batch, seq, dim]`` token states into ``[batch, dim]``.

    ``cls`` takes the first attended token (the [CLS]/<s> position), ``mean`` averages attended
    tokens in float32 (bf16 sums over long sequences lose precision), ``last_token`` takes the last
    attended token (decoder LMs, whose last position has seen the whole text).
    """
    if token_embeddings.dim() != 3:
        raise ValueError(f"token_embeddings must be [batch, seq, dim], got shape {tuple(token_embeddings.shape)}")
    if attention_mask.shape != token_embeddings.shape[:2]:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"token_embeddings {tuple(token_embeddings.shape[:2])}")
    rows = torch.arange(token_embeddings.shape[0], device=token_embeddings.device)
    if mode == "cls":
        return token_embeddings[rows, first_token_indices(attention_mask)]
    if mode == "last_token":
        return token_embeddings[rows, last_token_indices(attention_mask)]
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        summed = (token_embeddings.to(torch.float32) * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return (summed / counts).to(token_embeddings.dtype)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {', '.join(POOLING_MODES)}")


def truncate_embeddings(embeddings: torch.Tensor, dim: int | None, normalize: bool = True) -> torch.Tensor:
    """Matryoshka truncation: keep the first ``dim`` components, then re-normalise."""
    if dim is not None:
        if not 0 < dim <= embeddings.shape[-1]:
            raise ValueError(f"dimension {dim} is outside 1..{embeddings.shape[-1]}")
        embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, p=2, dim=-1) if normalize else embeddings


def truncate_embeddings_np(embeddings: np.ndarray, dim: int | None, normalize: bool = True) -> np.ndarray:
    """NumPy twin of :func:`truncate_embeddings` for evaluation code working on arrays."""
    if dim is not None:
        if not 0 < dim <= embeddings.shape[-1]:
            raise ValueError(f"dimension {dim} is outside 1..{embeddings.shape[-1]}")
        embeddings = embeddings[..., :dim]
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, 1e-12)
    return embeddings
