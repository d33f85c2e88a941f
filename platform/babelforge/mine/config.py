"""Configuration of the ``mine`` stage (``jobs/configs/mine.yaml``).

Mining reads the filter stage's output and searches the same candidate pool; by default it also
uses the teacher settings the pool was encoded with (recorded in the pool's ``store.json``)::

    >>> cfg = MineConfig.model_validate({"input": "/tmp/run/filter", "output_dir": "/tmp/run/mine",
    ...                                  "negatives": {"num_negatives": 3, "min_rank": 5, "max_rank": 50}})
    >>> cfg.resolved_pool_dir(), cfg.negatives.ratio, cfg.on_shortage
    ('/tmp/run/filter/_pool', 0.95, 'drop')

``on_shortage`` decides what happens to a pair with fewer than ``num_negatives`` usable negatives:
``drop`` quarantines it (reason ``too_few_negatives``), ``keep`` keeps it with the negatives it
has, ``pad_random`` fills the missing slots with random pool texts (``pad_candidates`` drawn per
pair, the same duplicate and false-negative rules apply) and quarantines it if still short.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from babelforge.config import StrictModel
from babelforge.data.config import RayOptions
from babelforge.filter.config import TeacherConfig, join_uri
from babelforge.index import IndexConfig
from babelforge.mine.sampling import NegativeSettings

__all__ = ["MineConfig"]


class MineConfig(StrictModel):
    """Everything the mine stage needs; see ``jobs/configs/mine.yaml`` for a commented example."""

    input: str                                    # the filter stage's output directory
    output_dir: str
    pool_dir: str | None = None                   # null: <input>/_pool
    teacher: TeacherConfig | None = None          # null: the teacher the pool was encoded with
    negatives: NegativeSettings = Field(default_factory=NegativeSettings)
    on_shortage: Literal["drop", "keep", "pad_random"] = "drop"
    pad_candidates: PositiveInt = 64              # random pool texts drawn per pair for pad_random
    index: IndexConfig = Field(default_factory=IndexConfig)
    ray: RayOptions = Field(default_factory=RayOptions)

    def resolved_pool_dir(self) -> str:
        return self.pool_dir or join_uri(self.input, "_pool")
