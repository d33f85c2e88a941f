"""Ray job: retrieval evaluation of an embedder (nDCG@10, Recall@k, MRR) (``babelforge eval``).

    python jobs/evaluate.py --config jobs/configs/eval.yaml [--set eval.max_queries=200]
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/eval.yaml
    babelforge submit --stage eval

Arguments and behaviour are those of ``babelforge eval`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("eval"))
