"""Ray job: read, clean, decontaminate and deduplicate corpora into parquet shards (``babelforge ingest``).

    python jobs/ingest.py --config jobs/configs/ingest.yaml [--set dedup.threshold=0.9]
    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/ingest.yaml
    babelforge submit --stage ingest

Arguments and behaviour are those of ``babelforge ingest`` (``--help`` lists them).
"""

import sys

from babelforge.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("ingest"))
