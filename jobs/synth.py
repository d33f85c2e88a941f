"""Ray job: persona-based synthesis of (query, positive, hard negative) examples (``babelforge synth``).

    python jobs/synth.py --config jobs/configs/synth.yaml [--set synth.quota_per_language=8]
    ray job submit --working-dir . -- python jobs/synth.py --config jobs/configs/synth.yaml
    babelforge submit --stage synth

Arguments and behaviour are those of ``babelforge synth`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("synth"))
