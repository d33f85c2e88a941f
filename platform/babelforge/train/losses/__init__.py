"""Training losses over embeddings (one per module, each citing its paper).

- :class:`InfoNCELoss` (``info_nce``): in-batch + hard-negative InfoNCE, gathered across workers,
  with GTE's bidirectional / same-side terms and false-negative masking.
- :class:`MatryoshkaLoss` (``matryoshka``): any loss over nested embedding prefixes.
- :func:`false_negative_mask` (``false_negatives``): the positive-aware masking rule.
"""

from babelforge.train.losses.base import EmbeddingLoss
from babelforge.train.losses.false_negatives import false_negative_mask
from babelforge.train.losses.info_nce import InfoNCELoss
from babelforge.train.losses.matryoshka import MatryoshkaLoss

__all__ = ["EmbeddingLoss", "InfoNCELoss", "MatryoshkaLoss", "false_negative_mask"]
