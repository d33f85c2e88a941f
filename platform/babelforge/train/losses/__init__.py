"""Training losses over embeddings (one per module, each citing its paper).

- :class:`InfoNCELoss` (``info_nce``): in-batch + hard-negative InfoNCE, gathered across workers,
  with GTE's bidirectional / same-side terms, false-negative and translation-group masking.
- :class:`MatryoshkaLoss` (``matryoshka``): any loss over nested embedding prefixes.
- :func:`false_negative_mask` (``false_negatives``): the positive-aware masking rule.
- :func:`group_id`, :func:`same_group_mask` (``groups``): translation groups as int64 ids, and
  the exact masking of a query's own group.
"""

from babelforge.train.losses.base import EmbeddingLoss
from babelforge.train.losses.false_negatives import false_negative_mask
from babelforge.train.losses.groups import NO_GROUP, group_id, same_group_mask
from babelforge.train.losses.info_nce import InfoNCELoss
from babelforge.train.losses.matryoshka import MatryoshkaLoss

__all__ = ["EmbeddingLoss", "InfoNCELoss", "MatryoshkaLoss", "false_negative_mask", "NO_GROUP", "group_id",
           "same_group_mask"]
