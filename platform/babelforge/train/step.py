"""One contrastive training step: tokenize, embed (chunked, optionally GradCache), loss, backward.

:class:`ContrastiveStep` is the compute core that a training loop calls once per batch; it does not
own the optimiser, the process group or the schedule. The loop passes ``backward_fn``: plain
``loss.backward`` by default, ``engine.backward`` under DeepSpeed. With ``grad_cache=True``,
``backward_fn`` is called once per chunk and the gradients accumulate, so DeepSpeed must leave the
accumulation boundary to ``engine.step()`` (``"managed_gradient_accumulation": false``), and under
ZeRO-3 the forward passes must go through the engine (``forward_fn=engine``): ZeRO-3 only switches
from overwriting to accumulating gradient partitions in ``engine.forward``. See ``docs/training.md``.

    >>> import torch
    >>> from babelforge.models.tiny import build_tiny_embedder
    >>> from babelforge.train.batching import BatchingConfig, ContrastiveBatcher
    >>> from babelforge.train.losses import InfoNCELoss, MatryoshkaLoss
    >>> model = build_tiny_embedder("xlm-roberta").train()
    >>> rows = [{"id": str(i), "query": f"question {i}", "positive": f"answer number {i}"} for i in range(8)]
    >>> batch = next(ContrastiveBatcher(rows, BatchingConfig(batch_size=8)).batches(0))
    >>> step = ContrastiveStep(model, MatryoshkaLoss(InfoNCELoss(), dims=[32, 16]), chunk_size=4, grad_cache=True)
    >>> metrics = step.run(batch)
    >>> metrics.pairs, sorted(metrics.terms), metrics.forward_passes
    (8, ['loss@16', 'loss@32', 'masked_group_negatives@16', 'masked_group_negatives@32'], 2)
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from babelforge.models.embedder import Embedder
from babelforge.train.batching import ContrastiveBatch
from babelforge.train.gradcache import (BackwardFn, Chunk, Encoder, backward_cached, embed_chunks,
                                        embed_without_grad, plan_chunks)
from babelforge.train.losses.base import EmbeddingLoss
from babelforge.train.losses.groups import group_id

__all__ = ["ContrastiveStep", "StepMetrics", "TokenizedBatch"]


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass
class TokenizedBatch:
    """Model inputs of a batch: queries ``[B, Lq]`` and passages ``[B + B·N, Lp]`` (positives first).

    ``groups`` are the texts' translation-group ids for the loss, ``[B, 1 + N]`` (column 0 the
    pair's, then each negative's; see :mod:`~babelforge.train.losses.groups`), or ``None``.
    """

    queries: dict[str, torch.Tensor]
    passages: dict[str, torch.Tensor]
    num_negatives: int
    groups: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        return int(self.queries["input_ids"].shape[0])

    def to(self, device: torch.device | str) -> "TokenizedBatch":
        move = lambda feats: {k: v.to(device, non_blocking=True) for k, v in feats.items()}  # noqa: E731
        groups = None if self.groups is None else self.groups.to(device, non_blocking=True)
        return TokenizedBatch(move(self.queries), move(self.passages), self.num_negatives, groups)


@dataclass
class StepMetrics:
    """What one step did on this worker.

    ``tokens`` counts real (non-padding) tokens embedded once; ``computed_tokens`` the token
    positions the model actually ran per pass after chunk trimming (padding included);
    ``forward_passes`` is 2 with GradCache (the extra no-grad pass).
    """

    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    passages: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    forward_passes: int = 1
    seconds: float = 0.0


class ContrastiveStep:
    """Embeds a batch with ``model`` and applies ``loss``; see the module docstring.

    Args:
        model: the :class:`Embedder` (its train/eval mode is the caller's business).
        loss: an :class:`EmbeddingLoss` (e.g. :class:`InfoNCELoss`, or :class:`MatryoshkaLoss` for
            Matryoshka dims and weights).
        max_query_length / max_passage_length: truncation, in tokens.
        chunk_size: rows per forward pass; rows are length-sorted and padding trimmed per chunk.
            ``None`` embeds each side in one pass.
        grad_cache: cache embedding gradients (needs ``chunk_size``); activation memory is then
            one chunk's, whatever the batch size.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast (the loss stays
            float32); ``None`` runs in the parameters' dtype.
        pad_to_multiple_of: chunk widths are rounded up to this (8 suits tensor cores).
        forward_fn: what embeds a features dict, ``model`` by default; pass the DeepSpeed engine
            (whose ``forward`` calls ``model.forward``) so its per-forward bookkeeping runs.
    """

    def __init__(self, model: Embedder, loss: EmbeddingLoss, *, max_query_length: int = 64,
                 max_passage_length: int = 256, chunk_size: int | None = None, grad_cache: bool = False,
                 autocast_dtype: torch.dtype | None = None, pad_to_multiple_of: int = 8,
                 forward_fn: Encoder | None = None) -> None:
        if grad_cache and chunk_size is None:
            raise ValueError("grad_cache=True needs a chunk_size (rows embedded per pass)")
        self.model = model
        self.loss = loss
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        self.chunk_size = chunk_size
        self.grad_cache = grad_cache
        self.autocast_dtype = autocast_dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        self.forward_fn = forward_fn or model

    def tokenize(self, batch: ContrastiveBatch) -> TokenizedBatch:
        """Tokenize on the CPU (prompts are already part of the batch's texts); hash the translation groups."""
        return TokenizedBatch(
            queries=self.model.tokenize(batch.query_texts(), prompt="", max_length=self.max_query_length),
            passages=self.model.tokenize(batch.passage_texts(), prompt="", max_length=self.max_passage_length),
            num_negatives=batch.num_negatives, groups=_group_ids(batch))

    def _encode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        device = features["input_ids"].device
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else nullcontext())
        with autocast:
            return self.forward_fn(features)

    def _loss(self, queries: torch.Tensor, passages: torch.Tensor, num_negatives: int,
              groups: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = queries.shape[0]
        negatives = passages[pairs:].view(pairs, num_negatives, -1) if num_negatives else None
        return self.loss.forward_with_terms(queries, passages[:pairs], negatives, groups)

    def run(self, batch: ContrastiveBatch | TokenizedBatch, backward_fn: BackwardFn = _backward) -> StepMetrics:
        """Forward, loss and backward of one batch; the caller then steps the optimiser.

        Every worker of a distributed job must call this with a batch of the same shape (the
        loss all-gathers embeddings).
        """
        started = time.perf_counter()
        cpu_inputs = batch if isinstance(batch, TokenizedBatch) else self.tokenize(batch)
        device = self.model.device
        plans = [plan_chunks(f["attention_mask"].cpu(), self.chunk_size, pad_to_multiple_of=self.pad_to_multiple_of,
                             device=device) for f in (cpu_inputs.queries, cpu_inputs.passages)]
        tokens = int(sum(f["attention_mask"].sum() for f in (cpu_inputs.queries, cpu_inputs.passages)))
        inputs = cpu_inputs.to(device)
        towers = [inputs.queries, inputs.passages]
        if self.grad_cache:
            cached = [embed_without_grad(self._encode, f, plan) for f, plan in zip(towers, plans)]
            leaves = [embeddings.detach().float().requires_grad_() for embeddings, _ in cached]
            loss, terms = self._loss(*leaves, inputs.num_negatives, inputs.groups)
            loss.backward()  # reaches only the embedding leaves (and the gather's collectives)
            for features, plan, (_, states), leaf in zip(towers, plans, cached, leaves):
                backward_cached(self._encode, features, plan, states, leaf.grad, backward_fn)
        else:
            embeddings = [embed_chunks(self._encode, f, plan) for f, plan in zip(towers, plans)]
            loss, terms = self._loss(*embeddings, inputs.num_negatives, inputs.groups)
            backward_fn(loss)
        values = torch.stack([loss.detach().float(), *(t.float() for t in terms.values())]).tolist()
        return StepMetrics(
            loss=values[0], terms=dict(zip(terms, values[1:])), pairs=inputs.pairs,
            passages=int(inputs.passages["input_ids"].shape[0]),
            tokens=tokens,
            computed_tokens=sum(_computed(plan) for plan in plans),
            forward_passes=2 if self.grad_cache else 1, seconds=time.perf_counter() - started)


def _group_ids(batch: ContrastiveBatch) -> torch.Tensor | None:
    """``[B, 1 + N]`` int64 group ids of the batch's pairs and negatives; ``None`` when it has no groups."""
    if batch.groups is None:
        return None
    negative_groups = batch.negative_groups or [[None] * batch.num_negatives for _ in batch.groups]
    return torch.tensor([[group_id(g) for g in (pair, *negatives)]
                         for pair, negatives in zip(batch.groups, negative_groups)], dtype=torch.int64)


def _computed(plan: list[Chunk]) -> int:
    return sum(len(c.rows) * (c.columns.stop - c.columns.start) for c in plan)
