"""Ray job: the whole babelforge pipeline (the README main job).

    python jobs/pipeline.py --config jobs/configs/pipeline.yaml [--set run_dir=runs/x] [--stages eval_base]
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

import babelforge.utils.ray_env  # noqa: F401  (before ray is imported: loopback for local clusters)
from babelforge.errors import BabelforgeError
from babelforge.pipeline import add_arguments, config_from_args, run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        run_pipeline(config_from_args(args))
    except BabelforgeError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
