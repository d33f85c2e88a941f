"""Ray job: hard-negative mining of filtered pairs (see babelforge.mine.stage).

    python jobs/mine.py --config jobs/configs/mine.yaml
    ray job submit --working-dir . -- python jobs/mine.py --config jobs/configs/mine.yaml --set ray.address=auto
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelforge.utils.ray_env import init_ray  # before ray: local clusters bind to loopback

from babelforge.config import load_config
from babelforge.errors import BabelforgeError
from babelforge.mine.config import MineConfig
from babelforge.mine.stage import format_report, run_mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/mine.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, MineConfig, args.overrides)
        init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
        print(format_report(run_mine(cfg)), flush=True)
    except BabelforgeError as err:
        print(f"mine: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
