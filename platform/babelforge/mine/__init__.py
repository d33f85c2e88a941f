"""Hard-negative mining: negatives for every filtered pair from the teacher's ranking of the pool.

    >>> from babelforge.mine import MineConfig, run_mine, format_report
    >>> cfg = MineConfig.model_validate({"input": "runs/filter", "output_dir": "runs/mine"})
    >>> print(format_report(run_mine(cfg)))                            # doctest: +SKIP

Modules: :mod:`.config` (MineConfig), :mod:`.sampling` (the pure selection rules),
:mod:`.stage` (:func:`run_mine`), :mod:`.cli` (``babelforge mine``).
"""

from babelforge.mine.config import MineConfig
from babelforge.mine.sampling import NegativeSettings, select_negatives
from babelforge.mine.stage import format_report, run_mine

__all__ = ["MineConfig", "NegativeSettings", "select_negatives", "run_mine", "format_report"]
