"""Ranking-consistency filtering: keep the pairs whose positive the teacher ranks within the top k.

    >>> from babelforge.filter import FilterConfig, run_filter, format_report
    >>> cfg = FilterConfig.model_validate({"output_dir": "runs/filter", "teacher": {"model": "models/me5-small"},
    ...                                    "inputs": [{"ntrex": {"pairs": ["en-de"]}}]})
    >>> print(format_report(run_filter(cfg)))                          # doctest: +SKIP

Modules: :mod:`.config` (FilterConfig, the shared TeacherConfig), :mod:`.pool` (the candidate
pool), :mod:`.ranking` (the pure rank rule), :mod:`.teacher` (search actors and shard streaming),
:mod:`.stage` (:func:`run_filter`), :mod:`.cli` (``babelforge filter``).
"""

from babelforge.filter.config import FilterConfig, PoolConfig, TeacherConfig
from babelforge.filter.stage import FILTERED_PAIR_SCHEMA, format_report, run_filter

__all__ = ["FilterConfig", "PoolConfig", "TeacherConfig", "FILTERED_PAIR_SCHEMA", "run_filter", "format_report"]
