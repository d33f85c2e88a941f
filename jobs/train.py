"""Ray job: contrastive training on Ray Train + DeepSpeed (``babelforge train``).

    python jobs/train.py --config jobs/configs/train_tiny.yaml [--set optim.max_steps=20]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train_qwen2_7b.yaml
    babelforge submit --stage train --config jobs/configs/train_me5_small.yaml

Arguments and behaviour are those of ``babelforge train`` (``--help`` lists them). Rerunning the
same command resumes from the run's last checkpoint.
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
