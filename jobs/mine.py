"""Ray job: hard-negative mining with false-negative guards (``babelforge mine``).

    python jobs/mine.py --config jobs/configs/mine.yaml [--set negatives.ratio=0.9]
    ray job submit --working-dir . -- python jobs/mine.py --config jobs/configs/mine.yaml
    babelforge submit --stage mine

Arguments and behaviour are those of ``babelforge mine`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("mine"))
