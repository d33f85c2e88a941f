"""Contrastive training compute: losses, batching, GradCache and the train step (no Ray in here).

Ray Train + DeepSpeed orchestration builds on this API; see ``docs/training.md``.

- :mod:`~babelforge.train.losses`: :class:`InfoNCELoss`, :class:`MatryoshkaLoss`.
- :mod:`~babelforge.train.batching`: :class:`ContrastiveBatcher`, :class:`BatchingConfig`,
  :class:`InstructionFormat`, :class:`PromptTemplates`, :class:`ContrastiveBatch`.
- :mod:`~babelforge.train.step`: :class:`ContrastiveStep`, :class:`StepMetrics`.
- :mod:`~babelforge.train.gradcache`: chunked embedding and cached-gradient backward.
- :mod:`~babelforge.train.distributed`: :func:`gather_with_grad`, :func:`rank`, :func:`world_size`.
"""

from babelforge.train.batching import (BatchingConfig, ContrastiveBatch, ContrastiveBatcher, GlobalBatch,
                                       InstructionFormat, PromptTemplates)
from babelforge.train.distributed import gather_with_grad, rank, world_size
from babelforge.train.losses import EmbeddingLoss, InfoNCELoss, MatryoshkaLoss
from babelforge.train.step import ContrastiveStep, StepMetrics, TokenizedBatch

__all__ = ["BatchingConfig", "ContrastiveBatch", "ContrastiveBatcher", "GlobalBatch", "InstructionFormat",
           "PromptTemplates", "gather_with_grad", "rank", "world_size", "EmbeddingLoss", "InfoNCELoss",
           "MatryoshkaLoss", "ContrastiveStep", "StepMetrics", "TokenizedBatch"]
