"""Ray job: ingest corpora into parquet shards with a quarantine (see babelforge.data.ingest).

    python jobs/ingest.py --config jobs/configs/ingest.yaml --set output_dir=/tmp/ingest
    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/ingest.yaml --set ray.address=auto
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelforge.utils.ray_env import init_ray  # before ray: local clusters bind to loopback

from babelforge.config import load_config
from babelforge.data.config import IngestConfig
from babelforge.data.ingest import format_report, run_ingest
from babelforge.errors import BabelforgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/ingest.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, IngestConfig, args.overrides)
        init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
        print(format_report(run_ingest(cfg)), flush=True)
    except BabelforgeError as err:
        print(f"ingest: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
