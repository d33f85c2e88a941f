"""Chunked embedding and GradCache: contrastive batches larger than activation memory allows.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv 2101.06983) notes that a contrastive loss couples examples only through their
embeddings, so the gradient splits at the embeddings:

1. embed every chunk of the batch **without** a graph, recording each chunk's RNG state;
2. compute the loss on the (gathered) embeddings and back-propagate it **to the embeddings only**,
   caching ``g = ∂L/∂e`` (the cross-worker gather's backward runs here, on every worker);
3. re-embed each chunk **with** a graph, replaying its RNG state so dropout draws the same masks,
   and back-propagate the surrogate ``Σ e·g``, whose parameter gradient is exactly the chunk's share
   of ``∂L/∂θ``.

Peak activation memory is one chunk's instead of the batch's, for the price of one extra forward
pass (≈ +33 % compute). The chunks also serve the uncached path: rows are sorted by length and
each chunk keeps only the token columns its rows use, which removes most padding FLOPs.

Example (eval mode, so the two paths see no dropout difference at all)::

    >>> import torch
    >>> from babelforge.models.tiny import build_tiny_embedder
    >>> model = build_tiny_embedder("xlm-roberta")
    >>> feats = model.tokenize(["a", "a longer text here", "mid text"])
    >>> chunks = plan_chunks(feats["attention_mask"], chunk_size=2)
    >>> [c.rows.tolist() for c in chunks], [c.columns.stop - c.columns.start for c in chunks]
    ([[1, 2], [0]], [12, 3])
    >>> emb, states = embed_without_grad(model, feats, chunks)
    >>> torch.allclose(emb, model(feats), atol=1e-6)
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["Chunk", "RngState", "plan_chunks", "chunk_features", "embed_chunks", "embed_without_grad",
           "backward_cached", "Encoder", "BackwardFn"]

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Chunk:
    """Rows of the batch embedded together, and the token columns they need."""

    rows: torch.Tensor
    columns: slice


def plan_chunks(attention_mask: torch.Tensor, chunk_size: int | None, *, pad_to_multiple_of: int = 1,
                device: torch.device | str | None = None) -> list[Chunk]:
    """Split a padded batch into chunks of at most ``chunk_size`` rows, longest rows first.

    Each chunk keeps the columns between its first and last attended token (so left and right
    padding both work), widened to a multiple of ``pad_to_multiple_of`` where the tensor allows
    (tensor cores; fewer distinct shapes for ``torch.compile``). ``chunk_size=None`` is one chunk
    of all rows in their original order. Plan on the CPU mask and pass the model's ``device`` for
    the row indices: planning reads values, which on a GPU would stall the stream.
    """
    rows, width = attention_mask.shape
    active = attention_mask.bool()
    if chunk_size is None:
        groups = [torch.arange(rows, device=attention_mask.device)]
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        order = torch.sort(active.sum(dim=1), descending=True, stable=True).indices
        groups = list(order.split(chunk_size))
    chunks = []
    for group in groups:
        used = active[group].any(dim=0).nonzero().flatten()
        start, stop = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, width)
        span = min(width, -(-(stop - start) // pad_to_multiple_of) * pad_to_multiple_of)
        stop = min(width, start + span)
        chunks.append(Chunk(group.to(device or attention_mask.device), slice(stop - span, stop)))
    return chunks


def chunk_features(features: dict[str, torch.Tensor], chunk: Chunk) -> dict[str, torch.Tensor]:
    """The chunk's rows and columns of every ``[batch, seq]`` feature tensor."""
    return {key: value[chunk.rows][:, chunk.columns] if value.dim() == 2 else value[chunk.rows]
            for key, value in features.items()}


class RngState:
    """Snapshot of the CPU RNG and, for a CUDA device, that device's RNG (dropout lives there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the snapshot's RNG state; the outer RNG state is left untouched."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _in_batch_order(parts: Sequence[torch.Tensor], chunks: Sequence[Chunk]) -> torch.Tensor:
    return torch.cat(list(parts))[torch.argsort(torch.cat([c.rows for c in chunks]))]


def embed_chunks(encode: Encoder, features: dict[str, torch.Tensor], chunks: Sequence[Chunk]) -> torch.Tensor:
    """Embed chunk by chunk **with** gradients; rows come back in batch order."""
    return _in_batch_order([encode(chunk_features(features, c)) for c in chunks], chunks)


def embed_without_grad(encode: Encoder, features: dict[str, torch.Tensor],
                       chunks: Sequence[Chunk]) -> tuple[torch.Tensor, list[RngState]]:
    """GradCache step 1: embeddings in batch order without a graph, plus each chunk's RNG state."""
    device = features["attention_mask"].device
    parts, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            parts.append(encode(chunk_features(features, chunk)))
    return _in_batch_order(parts, chunks), states


def backward_cached(encode: Encoder, features: dict[str, torch.Tensor], chunks: Sequence[Chunk],
                    states: Sequence[RngState], grad: torch.Tensor, backward_fn: BackwardFn) -> None:
    """GradCache step 3: re-embed each chunk with its RNG state and back-propagate ``Σ e·grad``.

    ``backward_fn`` is called once per chunk (``loss.backward`` or a DeepSpeed engine's
    ``backward``); parameter gradients accumulate across the calls.
    """
    for chunk, state in zip(chunks, states):
        with state.replay():
            embeddings = encode(chunk_features(features, chunk))
        surrogate = torch.sum(embeddings.float() * grad[chunk.rows].float())
        backward_fn(surrogate)
