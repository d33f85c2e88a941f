"""Hard-negative selection for one query, the pure part of mining (no Ray, no model).

Input: the teacher's ranked search results for the query (pool rows, scores, texts, best first;
whether each shares the pair's translation group), the positive (pool row, score, text) and
optionally the source's own hard negative. Rules, in order:

1. **Rank window**: a result at (1-based) position ``r`` of the teacher's ranking is a candidate
   only if ``min_rank <= r <= max_rank``. Positions count every pool text, the positive and the
   texts of the pair's group included, so with the positive ranked first, ``min_rank=2`` starts
   at the best non-positive text.
2. **Not the positive**: a candidate is dropped if it is the positive's pool row, if it shares
   the pair's translation group (``same_group``: another correct answer, e.g. a translation of
   the query into a third language; see :mod:`babelforge.schema`), if its normalised text (NFKC,
   case-folded, whitespace collapsed) equals the positive's, or, with ``near_duplicate_score``
   set, if its embedding's similarity to the positive's is at least that. Candidates whose
   normalised text equals the query's or repeats an already chosen negative are dropped too.
3. **False-negative guard**: a candidate scoring above ``ratio * positive_score`` is dropped (a
   text the teacher scores nearly as high as the positive is likely another positive). For a
   non-positive positive score the threshold is the positive score itself.
4. **Choice**: the source's hard negative comes first (``include_hard_negative``) if it passes
   rules 2 and 3; the remaining ``num_negatives`` slots are filled from the window, either the best
   ranked (``strategy: top``) or a uniform sample kept in rank order (``strategy: random``, seeded
   per pair so a result does not depend on batching).
5. **Padding** (optional): if slots remain, ``fallback`` candidates (random pool texts outside the
   window) are used in their given order, under rules 2 and 3.

    >>> import numpy as np
    >>> settings = NegativeSettings(num_negatives=2, min_rank=2, max_rank=5, ratio=0.9, strategy="top")
    >>> results = Candidates(rows=np.array([4, 8, 1, 6, 2]), scores=np.array([0.95, 0.9, 0.7, 0.6, 0.5]),
    ...                      texts=["pos", "near copy", "a", "b", "c"])
    >>> choice = select_negatives(results, Positive(row=4, score=0.95, text="pos"), settings, query="q",
    ...                           pair_id="p1")
    >>> choice.negatives, dict(choice.dropped)
    (['a', 'b'], {'over_ratio': 1})
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from pydantic import Field, PositiveInt, model_validator

from babelforge.config import StrictModel

__all__ = ["NegativeSettings", "Candidates", "Positive", "HardNegative", "NegativeChoice", "select_negatives",
           "normalize_for_match", "guard_threshold", "pair_rng", "DROP_REASONS"]

# Why candidates were not used (counted per pair, summed in the stage statistics).
DROP_REASONS = ("positive", "same_group", "same_text_as_positive", "near_duplicate_of_positive", "same_text_as_query",
                "repeated_text", "over_ratio")

_SPACES = re.compile(r"\s+")


class NegativeSettings(StrictModel):
    """How negatives are chosen (the ``negatives`` section of the mine config)."""

    num_negatives: PositiveInt = 7
    min_rank: PositiveInt = 10                  # rank window, 1-based and inclusive, positive included in the count
    max_rank: PositiveInt = 100                 # also the search depth
    ratio: float = Field(0.95, gt=0.0, le=1.0)  # false-negative guard: drop scores above ratio * positive score
    strategy: Literal["random", "top"] = "random"
    near_duplicate_score: float | None = Field(0.999, gt=0.0, le=1.0)   # null: no embedding near-duplicate check
    include_hard_negative: bool = True          # the source's own hard negative first (if it passes the guard)
    seed: int = 0

    @model_validator(mode="after")
    def _window(self) -> "NegativeSettings":
        if self.min_rank > self.max_rank:
            raise ValueError(f"rank window {self.min_rank}..{self.max_rank}: min_rank must be <= max_rank")
        return self


@dataclass
class Candidates:
    """Pool texts in rank order (position 0 = rank 1). Rows ``< 0`` are padding and ignored.

    ``positive_similarity[j]``: similarity of candidate ``j``'s embedding to the positive's (only
    needed for the near-duplicate rule). ``same_group[j]``: candidate ``j`` shares the pair's
    translation group (None: no candidate does).
    """

    rows: np.ndarray
    scores: np.ndarray
    texts: Sequence[str | None]
    positive_similarity: np.ndarray | None = None
    same_group: np.ndarray | None = None


@dataclass(frozen=True)
class Positive:
    row: int
    score: float
    text: str


@dataclass(frozen=True)
class HardNegative:
    """The source's own hard negative with the teacher's score for the query, similarity to the
    positive and whether it shares the pair's translation group."""

    text: str
    score: float
    positive_similarity: float | None = None
    same_group: bool = False


@dataclass
class NegativeChoice:
    negatives: list[str]
    hard_negative_used: bool = False
    padded: int = 0                                # negatives taken from the fallback candidates
    dropped: Counter = field(default_factory=Counter)


def normalize_for_match(text: str) -> str:
    """The form in which two texts count as the same: NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def guard_threshold(positive_score: float, ratio: float) -> float:
    """Highest score a negative may have: ``ratio * positive_score`` (the positive score if that is <= 0)."""
    return min(ratio * positive_score, positive_score)


def pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the pair id only (independent of batching and order)."""
    digest = hashlib.blake2b(f"{seed}:{pair_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


class _Rules:
    """Rules 2 and 3 with the texts chosen so far."""

    def __init__(self, query: str, positive: Positive, settings: NegativeSettings, dropped: Counter) -> None:
        self.positive = positive
        self.positive_key = normalize_for_match(positive.text)
        self.query_key = normalize_for_match(query)
        self.threshold = guard_threshold(positive.score, settings.ratio)
        self.near_duplicate_score = settings.near_duplicate_score
        self.chosen_keys: set[str] = set()
        self.dropped = dropped

    def reason(self, row: int | None, text: str | None, score: float, positive_similarity: float | None,
               same_group: bool) -> str | None:
        if row is not None and row == self.positive.row:
            return "positive"
        if same_group:
            return "same_group"
        key = normalize_for_match(text or "")
        if key == self.positive_key:
            return "same_text_as_positive"
        if (self.near_duplicate_score is not None and positive_similarity is not None
                and positive_similarity >= self.near_duplicate_score):
            return "near_duplicate_of_positive"
        if key == self.query_key:
            return "same_text_as_query"
        if key in self.chosen_keys:
            return "repeated_text"
        if score > self.threshold:
            return "over_ratio"
        return None

    def admit(self, row: int | None, text: str | None, score: float, positive_similarity: float | None,
              same_group: bool) -> bool:
        reason = self.reason(row, text, score, positive_similarity, same_group)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        return True

    def take(self, text: str) -> None:
        self.chosen_keys.add(normalize_for_match(text))


def _eligible(candidates: Candidates, positions: range, rules: _Rules) -> list[int]:
    similarity, same_group = candidates.positive_similarity, candidates.same_group
    eligible = []
    for j in positions:
        row = int(candidates.rows[j])
        if row < 0:
            continue
        if rules.admit(row, candidates.texts[j], float(candidates.scores[j]),
                       None if similarity is None else float(similarity[j]),
                       same_group is not None and bool(same_group[j])):
            eligible.append(j)
            rules.take(candidates.texts[j])
    return eligible


def select_negatives(candidates: Candidates, positive: Positive, settings: NegativeSettings, *, query: str,
                     pair_id: str, hard_negative: HardNegative | None = None,
                     fallback: Candidates | None = None) -> NegativeChoice:
    """Up to ``settings.num_negatives`` negatives for one query (see the module docstring for the rules)."""
    choice = NegativeChoice(negatives=[])
    rules = _Rules(query, positive, settings, choice.dropped)
    if settings.include_hard_negative and hard_negative is not None:
        if rules.admit(None, hard_negative.text, hard_negative.score, hard_negative.positive_similarity,
                       hard_negative.same_group):
            choice.negatives.append(hard_negative.text)
            choice.hard_negative_used = True
            rules.take(hard_negative.text)
    wanted = settings.num_negatives - len(choice.negatives)
    window = range(settings.min_rank - 1, min(settings.max_rank, len(candidates.rows)))
    eligible = _eligible(candidates, window, rules)
    if settings.strategy == "random" and len(eligible) > wanted:
        eligible = sorted(pair_rng(settings.seed, pair_id).choice(eligible, size=wanted, replace=False).tolist())
    choice.negatives.extend(candidates.texts[j] for j in eligible[:wanted])
    wanted = settings.num_negatives - len(choice.negatives)
    if wanted > 0 and fallback is not None:
        padding = _eligible(fallback, range(len(fallback.rows)), rules)[:wanted]
        choice.negatives.extend(fallback.texts[j] for j in padding)
        choice.padded = len(padding)
    return choice
