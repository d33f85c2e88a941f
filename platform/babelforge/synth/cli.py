"""``babelforge synth``: persona-based synthesis of training examples.

    babelforge synth --config jobs/configs/synth.yaml
    babelforge synth --config jobs/configs/synth_vllm.yaml --set synth.quota_per_language=100
"""

from __future__ import annotations

import argparse

from babelforge.cli import add_config_arguments
from babelforge.config import load_config
from babelforge.synth.config import SynthJobConfig

__all__ = ["register", "run_job", "CONFIG_MODEL"]

CONFIG_MODEL = SynthJobConfig


def run_job(config: SynthJobConfig) -> int:
    """Start or join Ray, run the stage, print its counts and throughput."""
    import ray

    from babelforge.synth.stage import format_summary, run_synth
    from babelforge.utils.ray_env import init_ray

    started_here = not ray.is_initialized()
    init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus)
    try:
        print(format_summary(run_synth(config)), flush=True)
    finally:
        if started_here:
            ray.shutdown()
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_job(load_config(args.config, SynthJobConfig, args.overrides))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="persona-based synthesis of training examples",
                                   description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, "jobs/configs/synth.yaml", "synth.quota_per_language=8")
    parser.set_defaults(func=_run)
