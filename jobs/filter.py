"""Ray job: ranking-consistency filtering of pairs with a teacher embedder (``babelforge filter``).

    python jobs/filter.py --config jobs/configs/filter.yaml [--set k=20]
    ray job submit --working-dir . -- python jobs/filter.py --config jobs/configs/filter.yaml
    babelforge submit --stage filter

Arguments and behaviour are those of ``babelforge filter`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("filter"))
