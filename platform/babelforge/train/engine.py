"""The trainable model and how it is stepped: plain PyTorch (DDP math) or DeepSpeed ZeRO, one interface.

:func:`build_model` loads the :class:`~babelforge.models.Embedder` to fine-tune (pooling and
prompt overrides, LoRA adapters via peft, frozen token embeddings, gradient checkpointing).
:func:`build_engine` wraps it with AdamW and the learning-rate schedule as a :class:`TrainEngine`:

- :class:`TorchEngine` (``strategy: ddp``): the model on the worker's device; after the
  step's backward passes the gradients are averaged over workers with bucketed all-reduces, which
  is the arithmetic of ``DistributedDataParallel``. DDP's wrapper itself is not used because it
  reduces inside every ``backward`` call, while a contrastive step calls ``backward`` once per
  GradCache chunk and per accumulated batch; the wrapper would either reduce each time or need
  ``no_sync`` bookkeeping of which call is the last.
- :class:`DeepSpeedEngine` (``strategy: deepspeed``): ``deepspeed.initialize`` with the config of
  :mod:`~babelforge.train.deepspeed_config`; every chunk goes through ``engine.backward`` and
  ``engine.step()`` closes the step (``managed_gradient_accumulation: false``). At ZeRO-3 the
  model is created partitioned (``zero.Init`` through transformers' ``HfDeepSpeedConfig``).

Both expose ``module`` (the :class:`Embedder`), ``forward_fn`` (what the step embeds with: the
module, or the DeepSpeed engine, through which ZeRO-3 must see every forward pass for gradients
of several backward calls to accumulate; see ``docs/training.md``), ``backward``, ``step``,
``lr``, ``save_state`` / ``load_state`` (a checkpoint directory) and ``full_parameters()`` (a
context in which rank 0 can read every weight, for export).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol

import torch
import torch.distributed as dist

from babelforge.models.embedder import Embedder
from babelforge.train.config import ModelSettings, OptimSettings, TrainConfig
from babelforge.train.deepspeed_config import build_deepspeed_config

log = logging.getLogger(__name__)

__all__ = ["TrainEngine", "TorchEngine", "DeepSpeedEngine", "build_model", "build_engine", "deepspeed_config_for",
           "lr_multiplier", "parameter_groups", "average_gradients", "export_model"]

TORCH_STATE_FILE = "torch_state.pt"
DEEPSPEED_TAG = "deepspeed"


# ---------------------------------------------------------------------- the model
def build_model(settings: ModelSettings, device: torch.device, *, matryoshka_dims: list[int] | None = None) -> Embedder:
    """The :class:`Embedder` to train, in training mode, with the options of ``settings`` applied.

    ``matryoshka_dims`` (the loss's dims) replace the model's served dims: the export then
    accepts exactly what training optimised (the full size is always served).
    """
    chosen = {"pooling": settings.pooling, "padding_side": settings.padding_side, "prompts": settings.prompts}
    overrides: dict[str, Any] = {key: value for key, value in chosen.items() if value is not None}
    model = Embedder.from_pretrained(settings.base, device=device, **overrides)
    if matryoshka_dims:
        model.config.matryoshka_dims = sorted({d for d in matryoshka_dims if d < model.hidden_size}, reverse=True)
    if settings.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            from babelforge.errors import ConfigError
            raise ConfigError("model.lora needs the peft package: pip install 'babelforge[lora]'") from err

        lora = settings.lora
        model.backbone = get_peft_model(model.backbone, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                                   lora_dropout=lora.dropout,
                                                                   target_modules=list(lora.target_modules)))
    elif settings.freeze_token_embeddings:
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions keep the full size here)
    log.info("model %s: %.1fM parameters, %.1fM trainable", settings.base,
             sum(numel(p) for p in model.parameters()) / 1e6,
             sum(numel(p) for p in model.parameters() if p.requires_grad) / 1e6)
    return model


def export_model(model: Embedder, path: str | Path) -> Path:
    """Save ``model`` as a babelforge model directory (LoRA adapters merged into the weights)."""
    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):  # a peft model: LoRA is on, so peft is installed
        backbone = backbone.merge_and_unload()
    exported = Embedder(backbone, model.tokenizer, model.config)
    return exported.save_pretrained(path)


# ---------------------------------------------------------------------- optimiser pieces
def lr_multiplier(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Factor of the peak learning rate after ``n`` scheduler steps: linear warmup, then the schedule."""
    def factor(n: int) -> float:
        if n < warmup_steps:
            return (n + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (n - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, matrices with weight decay, biases and norms without (BERT / GPT convention)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def average_gradients(parameters: list[torch.nn.Parameter], bucket_elements: int = 2**24) -> None:
    """Average ``.grad`` over all ranks in flattened buckets (what DDP's reducer computes)."""
    world = dist.get_world_size()
    grads = []
    for param in parameters:
        if param.grad is None:  # unused on this rank: all ranks must reduce the same tensors
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    start = 0
    while start < len(grads):
        stop, size = start, 0
        while stop < len(grads) and (size == 0 or size + grads[stop].numel() <= bucket_elements) \
                and grads[stop].dtype == grads[start].dtype:
            size += grads[stop].numel()
            stop += 1
        bucket = grads[start:stop]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        start = stop


# ---------------------------------------------------------------------- engines
class TrainEngine(Protocol):
    """What the training loop needs from an engine."""

    module: Embedder
    forward_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    partitions_parameters: bool   # ZeRO-3: every rank must take part in every forward pass
    shards_checkpoint: bool       # every rank writes part of the checkpoint (else rank 0 writes it all)

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    @property
    def lr(self) -> float: ...

    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...

    def full_parameters(self) -> ContextManager[None]: ...


class TorchEngine:
    """AdamW + schedule in plain PyTorch; gradients averaged across workers after backward."""

    partitions_parameters = False
    shards_checkpoint = False

    def __init__(self, model: Embedder, optim: OptimSettings) -> None:
        self.module = model
        self.forward_fn = model
        self.settings = optim
        self._params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if model.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                                           betas=optim.betas, eps=optim.eps, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(optim.schedule, optim.warmup_steps, optim.max_steps))

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.settings.accumulation_steps).backward()

    def step(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            average_gradients(self._params)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_state(self, directory: Path) -> None:
        trainable = {name for name, p in self.module.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in self.module.state_dict().items() if k in trainable}
        torch.save({"model": model_state, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, directory / TORCH_STATE_FILE)

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / TORCH_STATE_FILE, map_location=self.module.device, weights_only=True)
        unexpected = self.module.load_state_dict(state["model"], strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"checkpoint {directory} has weights this model lacks: {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_parameters(self) -> ContextManager[None]:
        return nullcontext()


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3, optional offload, bf16) behind the :class:`TrainEngine` interface."""

    shards_checkpoint = True

    def __init__(self, model: Embedder, config: dict[str, Any], optim: OptimSettings) -> None:
        import deepspeed

        schedule = lr_multiplier(optim.schedule, optim.warmup_steps, optim.max_steps)
        groups = parameter_groups(model, optim.weight_decay)
        if "optimizer" in config:  # offload: DeepSpeed builds its CPU Adam from the config
            optimizer, parameters = None, groups
        else:
            fused = {"fused": True} if model.device.type == "cuda" else {}
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **fused)
            parameters = None
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=parameters, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.module: Embedder = self.engine.module
        self.forward_fn = self.engine
        self.partitions_parameters = self.engine.zero_optimization_partition_weights()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clipping, optimiser, scheduler and zero_grad at the step boundary

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint with tag {DEEPSPEED_TAG!r} in {directory}")

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        if not self.partitions_parameters:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield


def deepspeed_config_for(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run (see :func:`~babelforge.train.deepspeed_config.build_deepspeed_config`)."""
    scaling, optim = cfg.scaling, cfg.optim
    optimizer = None
    if scaling.offload_optimizer:
        optimizer = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                 "weight_decay": optim.weight_decay}}
    return build_deepspeed_config(
        stage=scaling.zero_stage, micro_batch_size=cfg.data.batching.batch_size // world_size, world_size=world_size,
        accumulation_steps=optim.accumulation_steps, bf16=cfg.compute.precision == "bf16",
        gradient_clipping=optim.grad_clip, offload_optimizer=scaling.offload_optimizer,
        offload_params=scaling.offload_params, on_gpu=on_gpu, optimizer=optimizer, overrides=scaling.deepspeed)


def build_engine(cfg: TrainConfig, device: torch.device, world_size: int) -> TrainEngine:
    """Load the model (partitioned at ZeRO-3) and wrap it in the engine of ``cfg.scaling.strategy``."""
    dims = list(cfg.loss.matryoshka_dims)
    if cfg.scaling.strategy == "ddp":
        return TorchEngine(build_model(cfg.model, device, matryoshka_dims=dims), cfg.optim)
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    config = deepspeed_config_for(cfg, world_size, on_gpu=device.type == "cuda")
    zero_init = _zero3_init(config) if cfg.scaling.zero_stage == 3 else nullcontext()
    with zero_init:
        model = build_model(cfg.model, device, matryoshka_dims=dims)
    return DeepSpeedEngine(model, config, cfg.optim)


@contextmanager
def _zero3_init(config: dict[str, Any]) -> Iterator[None]:
    """Make ``from_pretrained`` build the model already partitioned (transformers' ``zero.Init`` hook).

    transformers keeps a weak reference to the ``HfDeepSpeedConfig``; it must stay alive while
    the model loads and is switched off afterwards so later loads (e.g. evaluation) are normal.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config
