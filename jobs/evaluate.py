"""Ray job: evaluate an embedder on the retrieval tasks of an eval config.

    python jobs/evaluate.py --config jobs/configs/eval.yaml [--model DIR] [--set eval.max_queries=200]
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/eval.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelforge.utils.ray_env import init_ray  # before ray is imported (loopback for local clusters)

from babelforge.errors import BabelforgeError
from babelforge.eval.cli import add_arguments, config_from_args, run_eval_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if cfg.eval.use_ray:
            init_ray(cfg.ray_address)
        run_eval_job(cfg, baseline=args.baseline)
    except BabelforgeError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
