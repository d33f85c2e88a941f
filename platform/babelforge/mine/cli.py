"""``babelforge mine``: hard negatives for the filtered pairs, written as training-ready parquet.

    babelforge mine --config jobs/configs/mine.yaml
    babelforge mine --config jobs/configs/mine.yaml --set negatives.num_negatives=3 --set on_shortage=keep

Reads a ``babelforge filter`` output and its pool; prints the per-stage counts. Rerunning the same
command resumes from the committed shards (and picks up filter shards committed since).
"""

from __future__ import annotations

import argparse
from typing import Any

from babelforge.cli import add_config_arguments
from babelforge.config import load_config
from babelforge.mine.config import MineConfig

__all__ = ["register", "run_mine_command", "DEFAULT_CONFIG", "CONFIG_MODEL"]

DEFAULT_CONFIG = "jobs/configs/mine.yaml"
CONFIG_MODEL = MineConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("mine", help="hard-negative mining with false-negative guards",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG, "negatives.ratio=0.9")
    parser.set_defaults(func=run_mine_command)


def run_mine_command(args: argparse.Namespace) -> int:
    from babelforge.mine.stage import format_report, run_mine

    cfg = load_config(args.config, MineConfig, args.overrides)
    print(format_report(run_mine(cfg)), flush=True)
    return 0
