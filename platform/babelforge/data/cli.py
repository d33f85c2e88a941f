"""``babelforge ingest``: read, clean and deduplicate corpora into parquet shards with a quarantine.

    babelforge ingest --config jobs/configs/ingest.yaml
    babelforge ingest --config jobs/configs/ingest.yaml --set output_dir=/tmp/ingest --set dedup.near=false

Rerunning the same command resumes an interrupted run from its last committed shard.
"""

from __future__ import annotations

import argparse
from typing import Any

from babelforge.cli import add_config_arguments
from babelforge.config import load_config
from babelforge.data.config import IngestConfig

__all__ = ["register", "run_ingest_command", "CONFIG_MODEL"]

CONFIG_MODEL = IngestConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("ingest", help="ingest corpora into parquet shards with quarantine",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "jobs/configs/ingest.yaml", "dedup.threshold=0.9")
    parser.set_defaults(func=run_ingest_command)


def run_ingest_command(args: argparse.Namespace) -> int:
    from babelforge.data.ingest import format_report, run_ingest

    cfg = load_config(args.config, IngestConfig, args.overrides)
    summary = run_ingest(cfg)
    print(format_report(summary), flush=True)
    return 0
