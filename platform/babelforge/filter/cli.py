"""``babelforge filter``: keep the pairs whose positive the teacher ranks within the top k of the pool.

    babelforge filter --config jobs/configs/filter.yaml
    babelforge filter --config jobs/configs/filter.yaml --set output_dir=/tmp/filter --set k=20

Prints the per-stage counts (rows in, kept, quarantined by reason). Rerunning the same command
resumes an interrupted run: committed shards, the pair shards and the encoded pool are reused.
"""

from __future__ import annotations

import argparse
from typing import Any

from babelforge.cli import add_config_arguments
from babelforge.config import load_config
from babelforge.filter.config import FilterConfig

__all__ = ["register", "run_filter_command", "DEFAULT_CONFIG", "CONFIG_MODEL"]

DEFAULT_CONFIG = "jobs/configs/filter.yaml"
CONFIG_MODEL = FilterConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("filter", help="ranking-consistency filtering with a teacher embedder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG, "k=20")
    parser.set_defaults(func=run_filter_command)


def run_filter_command(args: argparse.Namespace) -> int:
    from babelforge.filter.stage import format_report, run_filter

    cfg = load_config(args.config, FilterConfig, args.overrides)
    print(format_report(run_filter(cfg)), flush=True)
    return 0
