"""``babelforge train``: contrastive fine-tuning on Ray Train (+ DeepSpeed).

    babelforge train --config jobs/configs/train_tiny.yaml
    babelforge train --config jobs/configs/train_me5_small_cpu.yaml --set optim.max_steps=20
    babelforge train --config jobs/configs/train_qwen2_7b.yaml --set ray.address=auto

Prints the final model's location and the last metrics. Rerunning the same command resumes from
the run's last checkpoint (``name`` + ``storage_path`` identify the run).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from babelforge.cli import add_config_arguments
from babelforge.config import load_config
from babelforge.train.config import TrainConfig

__all__ = ["register", "run_train_command", "DEFAULT_CONFIG", "CONFIG_MODEL"]

DEFAULT_CONFIG = "jobs/configs/train_tiny.yaml"
CONFIG_MODEL = TrainConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="contrastive training on Ray Train + DeepSpeed",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG, "optim.max_steps=20")
    parser.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from babelforge.train.trainer import run_training

    cfg = load_config(args.config, TrainConfig, args.overrides)
    try:
        result = run_training(cfg)
    except TrainingFailedError as err:
        print(f"babelforge train: training failed ({str(err).strip().splitlines()[0][:300]}); rerun the same command "
              f"to resume from the last checkpoint under {cfg.storage_uri()}/{cfg.name}", flush=True)
        return 1
    print(json.dumps({"final_model": result.final_model_dir, "checkpoint": result.checkpoint_path,
                      "metrics": result.metrics}, indent=2, default=str), flush=True)
    return 0
