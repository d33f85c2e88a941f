"""Ray job: the whole babelforge pipeline (the README main job) (``babelforge run``).

    python jobs/pipeline.py --config jobs/configs/pipeline.yaml [--set run_dir=runs/try2]
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml
    babelforge submit --stage run

Arguments and behaviour are those of ``babelforge run`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
