"""Ray job: ranking-consistency filtering of pairs (see babelforge.filter.stage).

    python jobs/filter.py --config jobs/configs/filter.yaml
    ray job submit --working-dir . -- python jobs/filter.py --config jobs/configs/filter.yaml --set ray.address=auto
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelforge.utils.ray_env import init_ray  # before ray: local clusters bind to loopback

from babelforge.config import load_config
from babelforge.errors import BabelforgeError
from babelforge.filter.config import FilterConfig
from babelforge.filter.stage import format_report, run_filter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/filter.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, FilterConfig, args.overrides)
        init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
        print(format_report(run_filter(cfg)), flush=True)
    except BabelforgeError as err:
        print(f"filter: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
