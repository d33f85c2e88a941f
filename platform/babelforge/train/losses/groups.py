"""Translation groups in the loss: exact false negatives known from the data.

A ``TRAINING_SCHEMA`` row's ``group`` (see :mod:`babelforge.schema`) names the content its query
and positive express, e.g. ``"ntrex:17"`` for every translation of NTREX line 17. NTREX is
multi-parallel, so one global batch can hold ``en_17 -> de_17`` and ``ru_17 -> en_17``: each row's
positive is then a correct answer to the other row's query, and plain InfoNCE would push the two
translations apart. Where the margin rule of :mod:`~babelforge.train.losses.false_negatives`
*guesses* false negatives from scores, groups *know* them, so the loss removes every candidate of
the query's own group (except its positive) from the partition function.

Collectives move tensors, not strings, so groups travel as int64 ids: a 63-bit BLAKE2b hash of the
name, the same on every rank without communication, and :data:`NO_GROUP` (-1) for a text without a
group. Two distinct names of one global batch collide with probability about ``n² / 2⁶⁴`` (1e-13
for a thousand groups)::

    >>> group_id("ntrex:17") == group_id("ntrex:17") != group_id("ntrex:18"), group_id(None)
    (True, -1)
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["NO_GROUP", "group_id", "same_group_mask"]

NO_GROUP = -1


def group_id(name: str | None) -> int:
    """The int64 id of a group name (non-negative), :data:`NO_GROUP` for ``None`` or ``""``."""
    if not name:
        return NO_GROUP
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def same_group_mask(row_groups: torch.Tensor, candidate_groups: torch.Tensor,
                    is_positive: torch.Tensor) -> torch.Tensor:
    """``True`` where a candidate shares its row's group, the row's positive entries excepted.

    ``row_groups`` is ``[rows]``, ``candidate_groups`` ``[candidates]`` and ``is_positive``
    ``[rows, candidates]``; negative ids (no group) never match.
    """
    grouped = (row_groups >= 0).unsqueeze(1)
    return grouped & (row_groups.unsqueeze(1) == candidate_groups.unsqueeze(0)) & ~is_positive
