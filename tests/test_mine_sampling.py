"""Negative selection: never the positive (by row or by text), never a text of the pair's translation
group, never over ratio * positive score, only from the rank window, the source's hard negative
first unless it fails the guard."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from babelforge.mine.sampling import (Candidates, HardNegative, NegativeSettings, Positive, guard_threshold,
                                      normalize_for_match, select_negatives)

POSITIVE = Positive(row=0, score=0.8, text="The cat sat on the mat.")


def _ranked(texts: list[str], scores: list[float], rows: list[int] | None = None,
            similarity: list[float] | None = None, same_group: list[bool] | None = None) -> Candidates:
    return Candidates(rows=np.array(rows if rows is not None else range(1, len(texts) + 1)),
                      scores=np.array(scores, dtype=np.float32), texts=texts,
                      positive_similarity=None if similarity is None else np.array(similarity, dtype=np.float32),
                      same_group=None if same_group is None else np.array(same_group))


def _random_case(seed: int) -> tuple[Candidates, Positive]:
    """40 ranked results with the positive (and copies of its text) somewhere among them."""
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.uniform(0.2, 0.95, 40))[::-1]
    rows = rng.permutation(1000)[:40]
    texts = [f"text {r}" for r in rows]
    positive_at = int(rng.integers(0, 10))
    positive = Positive(row=int(rows[positive_at]), score=float(scores[positive_at]), text=texts[positive_at])
    for j in rng.choice([j for j in range(40) if j != positive_at], 3, replace=False):
        texts[j] = f"  {positive.text.upper()} "   # the positive's text again, under another pool row
    return _ranked(texts, scores.tolist(), rows.tolist()), positive


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("strategy", ["random", "top"])
def test_never_the_positive_never_over_the_ratio_always_in_the_window(seed, strategy):
    candidates, positive = _random_case(seed)
    settings = NegativeSettings(num_negatives=5, min_rank=3, max_rank=30, ratio=0.9, strategy=strategy)
    choice = select_negatives(candidates, positive, settings, query="a query", pair_id=f"pair-{seed}")
    threshold = 0.9 * positive.score
    position = {t: j for j, t in enumerate(candidates.texts)}
    for text in choice.negatives:
        j = position[text]
        assert int(candidates.rows[j]) != positive.row
        assert normalize_for_match(text) != normalize_for_match(positive.text)
        assert candidates.scores[j] <= threshold
        assert settings.min_rank <= j + 1 <= settings.max_rank
    assert len(set(choice.negatives)) == len(choice.negatives)
    eligible = [t for j, t in enumerate(candidates.texts[2:30], start=2)
                if candidates.scores[j] <= threshold and normalize_for_match(t) != normalize_for_match(positive.text)]
    assert len(choice.negatives) == min(5, len(eligible))
    if strategy == "top":
        assert choice.negatives == eligible[:5]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("strategy", ["random", "top"])
def test_never_a_text_of_the_pairs_translation_group(seed, strategy):
    """Translations of the query's sentence score anywhere, also well under the guard: only the
    group mask keeps them out, from the window and from the padding alike."""
    rng = np.random.default_rng(100 + seed)
    candidates, positive = _random_case(seed)
    candidates.same_group = rng.random(40) < 0.3
    fallback = _ranked([f"pad {i}" for i in range(20)], rng.uniform(0.0, 0.2, 20).tolist(),
                       rows=list(range(2000, 2020)), same_group=(rng.random(20) < 0.5).tolist())
    settings = NegativeSettings(num_negatives=30, min_rank=1, max_rank=40, ratio=1.0, strategy=strategy)
    choice = select_negatives(candidates, positive, settings, query="a query", pair_id=f"pair-{seed}",
                              fallback=fallback)
    in_group = ({t for t, g in zip(candidates.texts, candidates.same_group) if g}
                | {t for t, g in zip(fallback.texts, fallback.same_group) if g})
    assert choice.negatives and not set(choice.negatives) & in_group
    assert choice.padded > 0                                  # the padding was used, without group texts
    positive_rows = int((candidates.rows == positive.row).sum())
    grouped = int(candidates.same_group.sum() - candidates.same_group[candidates.rows == positive.row].sum())
    assert choice.dropped["same_group"] == grouped + int(fallback.same_group.sum())
    assert choice.dropped["positive"] == positive_rows


def test_a_same_group_hard_negative_is_not_used():
    candidates = _ranked(["a", "b", "c"], [0.5, 0.4, 0.3], same_group=[False, True, False])
    settings = NegativeSettings(num_negatives=2, min_rank=1, max_rank=3, strategy="top")
    translation = HardNegative("Le chat était assis sur le tapis.", score=0.3, positive_similarity=0.5,
                               same_group=True)
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p", hard_negative=translation)
    assert choice.negatives == ["a", "c"] and not choice.hard_negative_used
    assert choice.dropped == {"same_group": 2}


def test_guard_drops_candidates_scoring_above_ratio_times_positive():
    candidates = _ranked(["a", "b", "c", "d"], [0.79, 0.77, 0.75, 0.5])
    settings = NegativeSettings(num_negatives=4, min_rank=1, max_rank=4, ratio=0.95, strategy="top")
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p")
    assert choice.negatives == ["c", "d"]             # 0.95 * 0.8 = 0.76
    assert choice.dropped["over_ratio"] == 2


def test_positive_is_excluded_by_row_and_by_normalised_text():
    candidates = _ranked(["The cat sat on the mat.", "the  CAT sat on the mat.", "x", "y"], [0.7, 0.6, 0.5, 0.4],
                         rows=[0, 5, 6, 7])
    settings = NegativeSettings(num_negatives=4, min_rank=1, max_rank=4, strategy="top")
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p")
    assert choice.negatives == ["x", "y"]
    assert choice.dropped == {"positive": 1, "same_text_as_positive": 1}


def test_near_duplicates_of_the_positive_and_copies_of_the_query_are_dropped():
    candidates = _ranked(["paraphrase", "Query text", "fine"], [0.5, 0.4, 0.3], similarity=[0.9995, 0.2, 0.3])
    settings = NegativeSettings(num_negatives=3, min_rank=1, max_rank=3, near_duplicate_score=0.999, strategy="top")
    choice = select_negatives(candidates, POSITIVE, settings, query="query  text", pair_id="p")
    assert choice.negatives == ["fine"]
    assert choice.dropped == {"near_duplicate_of_positive": 1, "same_text_as_query": 1}


def test_rank_window_is_one_based_and_inclusive():
    texts = [f"t{i}" for i in range(1, 11)]
    candidates = _ranked(texts, np.linspace(0.7, 0.1, 10).tolist())
    settings = NegativeSettings(num_negatives=10, min_rank=3, max_rank=6, strategy="top")
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p")
    assert choice.negatives == ["t3", "t4", "t5", "t6"]


def test_hard_negative_comes_first_unless_it_fails_the_guard():
    candidates = _ranked(["a", "b", "c"], [0.5, 0.4, 0.3])
    settings = NegativeSettings(num_negatives=2, min_rank=1, max_rank=3, strategy="top")
    good = HardNegative("hard", score=0.7, positive_similarity=0.5)
    assert select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p",
                            hard_negative=good).negatives == ["hard", "a"]
    too_close = HardNegative("hard", score=0.79)                                    # > 0.95 * 0.8
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p", hard_negative=too_close)
    assert choice.negatives == ["a", "b"] and not choice.hard_negative_used
    settings_off = NegativeSettings(num_negatives=2, min_rank=1, max_rank=3, strategy="top",
                                    include_hard_negative=False)
    assert select_negatives(candidates, POSITIVE, settings_off, query="q", pair_id="p",
                            hard_negative=good).negatives == ["a", "b"]


def test_random_choice_is_seeded_per_pair_and_kept_in_rank_order():
    texts = [f"t{i}" for i in range(1, 31)]
    candidates = _ranked(texts, np.linspace(0.7, 0.1, 30).tolist())
    settings = NegativeSettings(num_negatives=4, min_rank=1, max_rank=30, strategy="random", seed=3)
    first = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p1").negatives
    assert first == select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p1").negatives
    assert first == sorted(first, key=texts.index)
    others = {tuple(select_negatives(candidates, POSITIVE, settings, query="q", pair_id=f"p{i}").negatives)
              for i in range(2, 12)}
    assert len(others) > 1


def test_fallback_pads_missing_negatives_under_the_same_rules():
    candidates = _ranked(["a"], [0.5])
    fallback = _ranked(["a", "The cat sat on the mat.", "too high", "r1", "r2"], [0.5, 0.2, 0.9, 0.1, 0.05],
                       rows=[1, 9, 10, 11, 12])
    settings = NegativeSettings(num_negatives=3, min_rank=1, max_rank=5, strategy="top")
    choice = select_negatives(candidates, POSITIVE, settings, query="q", pair_id="p", fallback=fallback)
    assert choice.negatives == ["a", "r1", "r2"] and choice.padded == 2


def test_guard_threshold_never_exceeds_the_positive_score():
    assert guard_threshold(0.8, 0.95) == pytest.approx(0.76)
    assert guard_threshold(-0.2, 0.95) == pytest.approx(-0.2)


def test_settings_validate_the_window():
    with pytest.raises(ValidationError, match="min_rank must be <= max_rank"):
        NegativeSettings(min_rank=20, max_rank=10)
