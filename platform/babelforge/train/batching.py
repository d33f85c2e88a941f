"""Contrastive batches from ``TRAINING_SCHEMA`` rows: task-homogeneous, hybrid-lingual, length-bucketed.

Every worker builds the same *plan* of global batches from the same rows, seed and epoch, and
takes its own shard of each, so all workers train on the same task at the same step without
communicating. A plan is a deterministic function of ``(seed, epoch)``; step ``s`` of epoch ``e``
is ``plan(e)[s]``.

- **Task-homogeneous batches**: rows are grouped by ``group_by`` (the ``task`` column by default,
  ``source`` for one dataset per batch). A global batch never mixes groups: in-batch negatives from
  another task are trivially easy, and a shared instruction format per batch is what
  KaLM-Embedding / E5-mistral train with. Each group is cut into batches, and the batches of all
  groups are interleaved in a seeded random order, so the probability that step ``s`` draws a task
  is proportional to the task's size.
- **Hybrid batches** (``cross_lingual_ratio``): hybrid batch training (Elmahdy et al. 2024,
  arXiv 2408.10536) exposes the model to monolingual and cross-lingual pairs in a set proportion.
  Here every global batch of a group that has both kinds holds ``round(ratio × batch_size)``
  cross-lingual rows (``query_lang != positive_lang``). The scarcer kind bounds the number of
  batches; the other kind is used in a window that rotates with the epoch, so no row repeats within
  an epoch and every row comes round within a few epochs. Groups with only one kind, or too few rows
  of one kind for a single batch, keep their natural mix.
- **Length bucketing** (``bucket_window``): within a group, windows of ``bucket_window`` batches of
  shuffled rows are sorted by length before being cut, so a batch holds rows of similar length and
  padding shrinks (the test measures it). Inside a batch, rows are dealt to workers round-robin in
  length order, so every worker gets the same mix of lengths and nobody waits at the gather.
- **Instructions**: :class:`InstructionFormat` renders the text prepended to queries and passages,
  e5 style (``query: `` / ``passage: ``, task instruction ignored) or instruct style
  (``Instruct: {instruction}\\nQuery: `` on queries, nothing on passages; KaLM-Embedding, Qwen3-Embedding,
  E5-mistral). A row's own ``instruction`` wins over the per-task default. ``task_templates``
  override the templates per task, so symmetric tasks (bitext: ``query: `` on both sides, e5's
  convention) and asymmetric ones (retrieval: ``query: `` / ``passage: ``) can share a run.
- **Negatives**: every row gets exactly ``num_negatives`` (fixed ``N`` keeps tensor shapes static).
  Rows with more mined negatives sample ``N`` of them per epoch; rows with fewer are topped up with
  random positives of other rows of the same group, never of a row of the row's own translation
  group (those positives are correct answers, as mining never picks them either).
- **Translation groups**: each shard carries its rows' ``group`` and each negative's (a topped-up
  negative's source row's; none for a mined one), which the loss uses to mask the false negatives
  of multi-parallel data exactly (:mod:`~babelforge.train.losses.groups`). The plan ignores
  groups: rows of one group may share a batch (see ``docs/training.md``).

Example::

    >>> rows = [{"id": str(i), "query": f"q{i}", "positive": f"p{i}", "task": "qa" if i % 2 else "bitext",
    ...          "query_lang": "en", "positive_lang": "de" if i % 4 == 0 else "en"} for i in range(16)]
    >>> batcher = ContrastiveBatcher(rows, BatchingConfig(batch_size=4, seed=1), rank=1, world_size=2)
    >>> batches = list(batcher.batches(epoch=0))
    >>> len(batches), len(batches[0]), batches[0].query_texts()[0][:7]
    (4, 2, 'query: ')
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from babelforge.errors import DataFormatError

__all__ = ["PromptTemplates", "InstructionFormat", "BatchingConfig", "ContrastiveBatch", "ContrastiveBatcher",
           "GlobalBatch"]

_INSTRUCTION = "{instruction}"


@dataclass(frozen=True)
class PromptTemplates:
    """One task's override of the query and/or passage template; ``None`` keeps the run-wide one."""

    query: str | None = None
    passage: str | None = None


@dataclass(frozen=True)
class InstructionFormat:
    """Templates of the prefixes put before query and passage texts.

    ``{instruction}`` in a template is replaced by the row's ``instruction`` or, when the row has
    none, by ``task_instructions[task]``; a template without the placeholder ignores instructions.
    ``task_templates[task]`` overrides ``query_template`` / ``passage_template`` for that task's
    rows (e.g. ``{"bitext": PromptTemplates(passage="query: ")}``).
    """

    query_template: str = "query: "
    passage_template: str = "passage: "
    task_instructions: Mapping[str, str] = field(default_factory=dict)
    task_templates: Mapping[str, PromptTemplates] = field(default_factory=dict)

    @classmethod
    def e5(cls) -> "InstructionFormat":
        """``query: `` / ``passage: `` (E5, multilingual-e5); task instructions are ignored."""
        return cls("query: ", "passage: ")

    @classmethod
    def instruct(cls, task_instructions: Mapping[str, str] | None = None) -> "InstructionFormat":
        """``Instruct: {instruction}\\nQuery: `` on queries, no passage prefix (KaLM, Qwen3-Embedding)."""
        return cls("Instruct: " + _INSTRUCTION + "\nQuery: ", "", dict(task_instructions or {}))

    def templates(self, task: str) -> tuple[str, str]:
        """The (query, passage) templates of ``task``: its override where set, else the run-wide ones."""
        override = self.task_templates.get(task, PromptTemplates())
        return (self.query_template if override.query is None else override.query,
                self.passage_template if override.passage is None else override.passage)

    def prompts(self, instruction: str | None, task: str, row_id: str) -> tuple[str, str]:
        """The rendered (query, passage) prompts of a row of ``task``."""
        query, passage = self.templates(task)
        return self.render(query, instruction, task, row_id), self.render(passage, instruction, task, row_id)

    def render(self, template: str, instruction: str | None, task: str, row_id: str) -> str:
        if _INSTRUCTION not in template:
            return template
        text = instruction or self.task_instructions.get(task)
        if not text:
            raise DataFormatError(f"row {row_id!r}: the prompt template needs an instruction, but the row's "
                                  f"'instruction' is empty and task {task!r} has no entry in task_instructions")
        return template.replace(_INSTRUCTION, text)


@dataclass(frozen=True)
class BatchingConfig:
    """How rows become global batches.

    ``batch_size`` is the *global* batch (pairs per optimiser step over all workers) and must be a
    multiple of the world size. ``cross_lingual_ratio`` (0..1, ``None`` = natural mix),
    ``bucket_window`` (batches per length-sorting window, ``None`` = no bucketing) and the other
    fields are explained in the module docstring. ``drop_last`` drops each group's last partial
    batch; otherwise it is kept, trimmed to a multiple of the world size.
    """

    batch_size: int
    num_negatives: int = 0
    group_by: str = "task"
    cross_lingual_ratio: float | None = None
    bucket_window: int | None = 16
    drop_last: bool = False
    seed: int = 0
    instructions: InstructionFormat = field(default_factory=InstructionFormat.e5)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.cross_lingual_ratio is not None and not 0.0 <= self.cross_lingual_ratio <= 1.0:
            raise ValueError(f"cross_lingual_ratio must be within [0, 1], got {self.cross_lingual_ratio}")
        if self.bucket_window is not None and self.bucket_window < 1:
            raise ValueError(f"bucket_window must be >= 1 or None, got {self.bucket_window}")


@dataclass(frozen=True)
class GlobalBatch:
    """One step of the plan: a group and the row indices of the whole global batch."""

    group: str
    rows: np.ndarray


@dataclass
class ContrastiveBatch:
    """One worker's shard of a global batch; ``negatives[i]`` has exactly ``num_negatives`` texts.

    ``groups[i]`` is row ``i``'s translation group (that of its query and positive) and
    ``negative_groups[i][k]`` that of ``negatives[i][k]``; ``None`` entries have no group, and a
    batch without them (``None``) masks nothing.
    """

    step: int
    task: str
    ids: list[str]
    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    query_prompts: list[str]
    passage_prompts: list[str]
    query_langs: list[str | None]
    positive_langs: list[str | None]
    groups: list[str | None] | None = None
    negative_groups: list[list[str | None]] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def num_negatives(self) -> int:
        return len(self.negatives[0]) if self.negatives else 0

    def query_texts(self) -> list[str]:
        """Queries with their prompts, as the model reads them."""
        return [prompt + text for prompt, text in zip(self.query_prompts, self.queries)]

    def passage_texts(self) -> list[str]:
        """Positives, then every row's negatives row-major (``B + B·N`` texts), with prompts."""
        texts = [prompt + text for prompt, text in zip(self.passage_prompts, self.positives)]
        for prompt, negatives in zip(self.passage_prompts, self.negatives):
            texts.extend(prompt + text for text in negatives)
        return texts


class ContrastiveBatcher:
    """Plans and shards contrastive batches; build one per worker from the same rows and config."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], config: BatchingConfig, *, rank: int = 0,
                 world_size: int = 1) -> None:
        if config.batch_size % world_size:
            raise ValueError(f"batch_size {config.batch_size} is not a multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.rows = [_checked(row, i) for i, row in enumerate(rows)]
        if not self.rows:
            raise DataFormatError("no training rows")
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(str(row.get(config.group_by) or "default"), []).append(i)
        self.groups = {name: np.asarray(groups[name], dtype=np.int64) for name in sorted(groups)}
        self._cross = np.array([_is_cross_lingual(row) for row in self.rows], dtype=bool)
        self._length = np.array([len(row["query"]) + len(row["positive"]) for row in self.rows], dtype=np.int64)
        self._steps_per_epoch = len(self.plan(0))

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    # ------------------------------------------------------------------ planning (same on every rank)
    def plan(self, epoch: int) -> list[GlobalBatch]:
        """The epoch's global batches in training order."""
        seeds = np.random.SeedSequence([self.config.seed, epoch]).spawn(len(self.groups) + 1)
        batches: list[GlobalBatch] = []
        for seed, (name, rows) in zip(seeds, self.groups.items()):
            static = np.random.default_rng([self.config.seed, zlib.crc32(name.encode())])  # the same every epoch
            group_batches = self._group_batches(rows, epoch, np.random.default_rng(seed), static)
            batches.extend(GlobalBatch(name, b) for b in group_batches)
        order = np.random.default_rng(seeds[-1]).permutation(len(batches))
        return [batches[i] for i in order]

    def _group_batches(self, rows: np.ndarray, epoch: int, rng: np.random.Generator,
                       static: np.random.Generator) -> list[np.ndarray]:
        size = self.config.batch_size
        ratio = self.config.cross_lingual_ratio
        cross = self._cross[rows]
        if ratio is not None:
            n_cross = round(ratio * size)
            parts = [(rows[~cross], size - n_cross), (rows[cross], n_cross)]
            used = [(pool, quota) for pool, quota in parts if quota]
            n_batches = min(len(pool) // quota for pool, quota in used)
            if n_batches and all(len(pool) for pool, _ in parts):
                # Each side: a fixed permutation, of which each epoch takes the next window of the
                # rows it needs (all of them, up to a remainder, for the scarcer side), then a fresh
                # shuffle before bucketing.
                sides = []
                for pool, quota in parts:
                    need = n_batches * quota
                    fixed = static.permutation(pool)
                    start = (epoch * need) % len(pool)
                    sides.append((rng.permutation(np.roll(fixed, -start)[:need]), quota))
                return self._bucketed(sides, n_batches)
        order = rng.permutation(rows)
        n_full, tail = divmod(len(order), size)
        keep = n_full * size + (0 if self.config.drop_last else tail - tail % self.world_size)
        order = order[:keep]
        if not len(order):
            return []
        return self._bucketed([(order, size)], math.ceil(len(order) / size))

    def _bucketed(self, sides: Sequence[tuple[np.ndarray, int]], n_batches: int) -> list[np.ndarray]:
        """Cut ``n_batches`` batches taking ``quota`` rows of each side per batch, sorting windows by length.

        Each side's rows are length-sorted within the batch and the sides are concatenated, so
        dealing positions round-robin to workers (``rows[rank::W]``) gives every worker the same
        share of each side (±1) and the same spread of lengths.
        """
        window = self.config.bucket_window or 1
        batches: list[np.ndarray] = []
        for first in range(0, n_batches, window):
            count = min(window, n_batches - first)
            pieces: list[list[np.ndarray]] = [[] for _ in range(count)]
            for rows, quota in sides:
                chunk = rows[first * quota:(first + count) * quota]
                if self.config.bucket_window is not None:
                    chunk = chunk[np.argsort(self._length[chunk], kind="stable")]
                for j in range(count):
                    piece = chunk[j * quota:(j + 1) * quota]
                    pieces[j].append(piece[np.argsort(self._length[piece], kind="stable")])
            batches.extend(np.concatenate(parts) for parts in pieces)
        return batches

    # ------------------------------------------------------------------ this worker's shards
    def batches(self, epoch: int, start_step: int = 0) -> Iterator[ContrastiveBatch]:
        """This worker's shard of each global batch of ``epoch``, from ``start_step`` (for resuming)."""
        for step, global_batch in enumerate(self.plan(epoch)[start_step:], start=start_step):
            yield self.shard(global_batch, epoch, step)

    def shard(self, global_batch: GlobalBatch, epoch: int, step: int) -> ContrastiveBatch:
        """Rows ``rank, rank + W, ...`` of the global batch, with prompts, negatives and translation groups."""
        fmt = self.config.instructions
        rows = global_batch.rows[self.rank::self.world_size]
        data = [self.rows[i] for i in rows]
        ids = [str(r["id"]) for r in data]
        prompts = [fmt.prompts(r.get("instruction"), str(r.get("task") or global_batch.group), i)
                   for r, i in zip(data, ids)]
        negatives = [self._negatives(i, global_batch.group, epoch) for i in rows]
        return ContrastiveBatch(
            step=step, task=global_batch.group, ids=ids,
            queries=[r["query"] for r in data], positives=[r["positive"] for r in data],
            negatives=[[text for text, _ in n] for n in negatives],
            query_prompts=[query for query, _ in prompts], passage_prompts=[passage for _, passage in prompts],
            query_langs=[r.get("query_lang") for r in data], positive_langs=[r.get("positive_lang") for r in data],
            groups=[r.get("group") for r in data], negative_groups=[[group for _, group in n] for n in negatives])

    def _negatives(self, index: int, group: str, epoch: int) -> list[tuple[str, str | None]]:
        """Row ``index``'s ``num_negatives`` negatives of the epoch, each with its translation group."""
        wanted = self.config.num_negatives
        if not wanted:
            return []
        rng = np.random.default_rng([self.config.seed, epoch, int(index)])
        mined = [(t, None) for t in (self.rows[index].get("negatives") or []) if t]
        if len(mined) >= wanted:
            return [mined[i] for i in sorted(rng.choice(len(mined), wanted, replace=False))]
        own = self.rows[index].get("group")
        fill: list[tuple[str, str | None]] = []
        for j in rng.permutation(self.groups[group]):
            other = self.rows[int(j)]
            if j == index or (own and other.get("group") == own):
                continue
            fill.append((other["positive"], other.get("group")))
            if len(mined) + len(fill) == wanted:
                return mined + fill
        raise DataFormatError(f"row {self.rows[index]['id']!r}: has {len(mined)} negatives, and group {group!r} has "
                              f"too few rows outside the row's translation group to top them up to "
                              f"num_negatives={wanted}")


def _checked(row: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    name = row.get("id", f"#{index}")
    for key in ("id", "query", "positive"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataFormatError(f"training row {name!r} (index {index}): '{key}' must be a non-empty string, "
                                  f"got {value!r}")
    return row


def _is_cross_lingual(row: Mapping[str, Any]) -> bool:
    q, p = row.get("query_lang"), row.get("positive_lang")
    return bool(q) and bool(p) and q != p
