"""Ray job: persona-based synthesis (``python jobs/synth.py --config jobs/configs/synth.yaml``).

Equivalent to ``babelforge synth``; submit it with ``ray job submit -- python jobs/synth.py ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelforge.utils import ray_env  # noqa: F401  (loopback for local Ray before ray is imported)
from babelforge.config import load_config
from babelforge.errors import BabelforgeError
from babelforge.synth.cli import run_job
from babelforge.synth.config import SynthJobConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="jobs/configs/synth.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_job(load_config(args.config, SynthJobConfig, args.overrides))
    except BabelforgeError as err:
        print(f"synth: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
