"""Contrastive batching: coverage, task homogeneity, hybrid ratio, rank determinism, bucketing, negatives,
translation groups, prompts."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from babelforge.errors import DataFormatError
from babelforge.models.tiny import build_tiny_tokenizer
from babelforge.resources import ntrex_file
from babelforge.train.batching import BatchingConfig, ContrastiveBatcher, InstructionFormat, PromptTemplates

TASK_SIZES = {"qa": 96, "bitext": 160, "short_short": 40}


def make_rows(seed: int = 0, cross_share: float = 0.3) -> list[dict]:
    """Rows of three tasks with NTREX texts of varied lengths, some of them cross-lingual."""
    rng = random.Random(seed)
    en = ntrex_file("en").read_text(encoding="utf-8").splitlines()
    rows = []
    for task, size in TASK_SIZES.items():
        for k in range(size):
            i = len(rows)
            passage = " ".join(en[i + j] for j in range(rng.choice([1, 1, 2, 4])))
            cross = rng.random() < cross_share
            rows.append({"id": f"{task}-{k}", "query": en[i][: rng.randint(10, 120)], "positive": passage,
                         "negatives": [en[(i + 7 * j) % 1900] for j in range(1, rng.randint(0, 5))],
                         "task": task, "instruction": f"Retrieve for {task}",
                         "query_lang": "en", "positive_lang": "de" if cross else "en"})
    return rows


def test_every_row_once_per_epoch_and_batches_are_task_homogeneous():
    rows = make_rows()
    for world in (1, 2, 4):
        config = BatchingConfig(batch_size=16, seed=3)
        batchers = [ContrastiveBatcher(rows, config, rank=r, world_size=world) for r in range(world)]
        for epoch in (0, 1):
            seen: Counter[str] = Counter()
            for shards in zip(*(b.batches(epoch) for b in batchers)):
                assert len({s.task for s in shards}) == 1, "ranks disagree on the step's task"
                assert len({len(s) for s in shards}) == 1, "uneven shards"
                for s in shards:
                    assert {i.split("-")[0] for i in s.ids} == {s.task}
                    seen.update(s.ids)
            assert sorted(seen) == sorted(r["id"] for r in rows) and set(seen.values()) == {1}, (world, epoch)
        assert batchers[0].steps_per_epoch == sum(-(-n // 16) for n in TASK_SIZES.values())


def test_plan_is_a_deterministic_function_of_seed_and_epoch_and_tasks_follow_sizes():
    rows = make_rows()
    config = BatchingConfig(batch_size=16, seed=7)
    a, b = ContrastiveBatcher(rows, config, rank=0, world_size=2), ContrastiveBatcher(rows[::-1][::-1], config,
                                                                                       rank=1, world_size=2)
    tasks = lambda batcher, epoch: [g.group for g in batcher.plan(epoch)]  # noqa: E731
    assert tasks(a, 0) == tasks(b, 0)
    assert all(np.array_equal(x.rows, y.rows) for x, y in zip(a.plan(0), b.plan(0)))
    assert tasks(a, 0) != tasks(a, 1)  # a fresh order each epoch...
    assert Counter(tasks(a, 0)) == Counter(tasks(a, 1)) == {t: -(-n // 16) for t, n in TASK_SIZES.items()}
    other_seed = ContrastiveBatcher(rows, BatchingConfig(batch_size=16, seed=8))
    assert tasks(other_seed, 0) != tasks(a, 0)
    # ...and resuming mid-epoch yields exactly the remaining shards.
    resumed = [s.ids for s in a.batches(0, start_step=5)]
    assert resumed == [s.ids for s in a.batches(0)][5:]


def test_hybrid_batches_hold_the_configured_cross_lingual_share():
    rows = make_rows(cross_share=0.3)
    cross_ids = {r["id"] for r in rows if r["query_lang"] != r["positive_lang"]}
    config = BatchingConfig(batch_size=20, cross_lingual_ratio=0.25, seed=1)
    batcher = ContrastiveBatcher(rows, config, rank=0, world_size=1)
    per_epoch = []
    for epoch in range(4):
        ids = []
        for batch in batcher.batches(epoch):
            assert sum(i in cross_ids for i in batch.ids) == 5  # round(0.25 * 20), in every batch
            assert all(c == (q != p) for c, q, p in zip([i in cross_ids for i in batch.ids], batch.query_langs,
                                                         batch.positive_langs))
            ids.extend(batch.ids)
        assert len(ids) == len(set(ids)), "a row repeated within an epoch"
        per_epoch.append(set(ids))
    # The abundant (monolingual) side rotates, so over a few epochs every row of it is used.
    mono_ids = {r["id"] for r in rows} - cross_ids
    covered = set().union(*per_epoch)
    assert len(covered & mono_ids) / len(mono_ids) > 0.95
    assert per_epoch[0] != per_epoch[1]

    # Sharded over two workers, each shard carries close to the same share (round-robin in length order).
    shards = [next(ContrastiveBatcher(rows, config, rank=r, world_size=2).batches(0)) for r in range(2)]
    assert [sum(i in cross_ids for i in s.ids) for s in shards] in ([2, 3], [3, 2])
    # Ratio 0 keeps monolingual pairs only; a task without cross-lingual rows keeps its natural mix.
    mono_only = ContrastiveBatcher(rows, BatchingConfig(batch_size=20, cross_lingual_ratio=0.0))
    assert not any(i in cross_ids for b in mono_only.batches(0) for i in b.ids)


def _padding_fraction(batcher: ContrastiveBatcher, tokenizer) -> float:
    real = padded = 0
    for batch in batcher.batches(0):
        for texts in (batch.query_texts(), batch.passage_texts()):
            lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return 1 - real / padded


def test_length_bucketing_reduces_padding():
    rows = make_rows()
    tokenizer = build_tiny_tokenizer()
    random_batches = _padding_fraction(ContrastiveBatcher(rows, BatchingConfig(batch_size=16, bucket_window=None)),
                                       tokenizer)
    bucketed = _padding_fraction(ContrastiveBatcher(rows, BatchingConfig(batch_size=16, bucket_window=8)), tokenizer)
    assert random_batches > 0.3
    assert bucketed < 0.7 * random_batches, (bucketed, random_batches)  # measured: 0.31 vs 0.54


def test_fixed_number_of_negatives_sampled_or_topped_up():
    rows = make_rows()
    by_id = {r["id"]: r for r in rows}
    batcher = ContrastiveBatcher(rows, BatchingConfig(batch_size=16, num_negatives=3, seed=2))
    for batch in batcher.batches(0):
        assert batch.num_negatives == 3
        for rid, negatives, positive in zip(batch.ids, batch.negatives, batch.positives):
            assert len(negatives) == 3 and positive not in negatives
            mined = by_id[rid]["negatives"]
            if len(mined) >= 3:
                assert set(negatives) <= set(mined)
            else:  # mined first, then positives of other rows of the same task
                assert negatives[:len(mined)] == mined
                task_positives = {r["positive"] for r in rows if r["task"] == batch.task}
                assert set(negatives[len(mined):]) <= task_positives
    first = [s.negatives for s in batcher.batches(0)]
    assert first == [s.negatives for s in ContrastiveBatcher(rows, batcher.config).batches(0)]
    assert len(batch.passage_texts()) == len(batch) * 4


def test_shards_carry_translation_groups_and_top_ups_skip_the_rows_own_group():
    # Multi-parallel bitext: 12 lines in 4 directions, one group per line; some rows have no group.
    en, de = (ntrex_file(lang).read_text(encoding="utf-8").splitlines() for lang in ("en", "de"))
    rows = []
    for line in range(12):
        for k, (query, positive) in enumerate([(en, de), (de, en), (en, en), (de, de)]):
            rows.append({"id": f"{line}-{k}", "query": query[line] + f" ({k})", "positive": positive[line],
                         "task": "bitext", "group": f"ntrex:{line}" if line < 10 else None})
    by_id = {r["id"]: r for r in rows}
    batcher = ContrastiveBatcher(rows, BatchingConfig(batch_size=8, num_negatives=5, seed=4), rank=1, world_size=2)
    shared = 0
    for epoch in range(3):
        for batch in batcher.batches(epoch):
            assert batch.groups == [by_id[i].get("group") for i in batch.ids]
            for group, negatives, negative_groups in zip(batch.groups, batch.negatives, batch.negative_groups):
                sources = [r for r in rows if r["positive"] in negatives]
                assert len(negative_groups) == 5 and set(negative_groups) <= {r.get("group") for r in sources}
                if group is not None:   # topped up from other lines only
                    assert group not in negative_groups
                    assert not set(negatives) & {r["positive"] for r in rows if r.get("group") == group}
            shared += len(batch.groups) - len(set(batch.groups))
    assert shared > 0   # the plan does not keep a group's rows apart: the loss masks them instead


def test_instruction_formats():
    rows = make_rows()[:32]
    rows[0] = {**rows[0], "instruction": None}
    e5 = next(ContrastiveBatcher(rows, BatchingConfig(batch_size=32)).batches(0))
    assert e5.query_texts()[0].startswith("query: ") and e5.passage_texts()[0].startswith("passage: ")

    fmt = InstructionFormat.instruct({"qa": "Given a question, retrieve passages that answer it"})
    batch = next(ContrastiveBatcher(rows, BatchingConfig(batch_size=32, instructions=fmt)).batches(0))
    prompts = dict(zip(batch.ids, batch.query_prompts))
    assert prompts[rows[0]["id"]] == "Instruct: Given a question, retrieve passages that answer it\nQuery: "
    assert prompts[rows[1]["id"]] == "Instruct: Retrieve for qa\nQuery: "
    assert set(batch.passage_prompts) == {""}
    assert batch.query_texts()[0] == batch.query_prompts[0] + batch.queries[0]

    # Per-task templates: symmetric bitext ("query: " on both sides) next to asymmetric retrieval.
    fmt = InstructionFormat("query: ", "passage: ", task_templates={
        "bitext": PromptTemplates(passage="query: "), "qa": PromptTemplates(query="question: ")})
    retagged = [{**r, "id": f"{task}{i}", "task": task} for task in ("bitext", "short_short")
                for i, r in enumerate(rows[:16])]
    batcher = ContrastiveBatcher(rows[:16] + retagged, BatchingConfig(batch_size=16, instructions=fmt))
    prompts = {b.task: (set(b.query_prompts), set(b.passage_prompts)) for b in batcher.batches(0)}
    assert prompts == {"qa": ({"question: "}, {"passage: "}), "short_short": ({"query: "}, {"passage: "}),
                       "bitext": ({"query: "}, {"query: "})}
    assert fmt.templates("unknown") == ("query: ", "passage: ")

    with pytest.raises(DataFormatError, match=r"row 'qa-0'.*task_instructions"):
        next(ContrastiveBatcher(rows, BatchingConfig(batch_size=32, instructions=InstructionFormat.instruct()))
             .batches(0))


def test_bad_rows_and_configs_are_rejected_with_their_names():
    rows = make_rows()[:8]
    with pytest.raises(DataFormatError, match=r"'qa-3'.*'positive'"):
        ContrastiveBatcher([*rows[:3], {**rows[3], "positive": " "}], BatchingConfig(batch_size=4))
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        ContrastiveBatcher(rows, BatchingConfig(batch_size=4), rank=0, world_size=3)
    with pytest.raises(ValueError, match="cross_lingual_ratio"):
        BatchingConfig(batch_size=4, cross_lingual_ratio=1.5)
