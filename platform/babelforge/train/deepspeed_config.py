"""The DeepSpeed config of a run, and the memory its model states need per GPU.

:func:`build_deepspeed_config` turns the train config's knobs into a DeepSpeed JSON config:

- ZeRO ``stage`` 0-3; ``offload_optimizer`` (stages 1-3) and ``offload_params`` (stage 3) move
  optimizer states / parameters to CPU memory (DeepSpeed then uses its CPU Adam).
- ``bf16``: parameters and gradients in bf16, fp32 master weights in the optimizer.
- ``gradient_clipping`` on the global gradient norm.
- ``managed_gradient_accumulation: false``: ``engine.backward`` only accumulates and
  ``engine.step()`` is the accumulation boundary. GradCache calls ``backward`` once per chunk and
  the loop may accumulate several batches; both need the boundary to be the step, not a count of
  backward calls. ``gradient_accumulation_steps`` is still declared (DeepSpeed divides each
  backward's loss by it, and checks ``train_batch_size = micro x accumulation x world``).

Memory: :func:`estimate_model_states_memory` calls DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the
functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold``) for parameters,
gradients and Adam states; stages 0 and 1 use the ZeRO paper's accounting (DeepSpeed has no
estimator for them). Activations come on top and depend on batch, length and checkpointing.

    >>> cfg = build_deepspeed_config(stage=2, micro_batch_size=16, world_size=4, bf16=True, gradient_clipping=1.0)
    >>> cfg["train_batch_size"], cfg["zero_optimization"]["stage"], cfg["bf16"]["enabled"]
    (64, 2, True)
    >>> est = estimate_model_states_memory(total_params=10**9, largest_layer_params=10**8, stage=3, gpus_per_node=8)
    >>> round(est.per_gpu_bytes / 2**30, 1)
    2.5
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Mapping

__all__ = ["build_deepspeed_config", "merge_config", "MemoryEstimate", "estimate_model_states_memory",
           "count_parameters"]

_POOLER_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "camembert")  # Embedder drops their pooler


def build_deepspeed_config(*, stage: int, micro_batch_size: int, world_size: int, accumulation_steps: int = 1,
                           bf16: bool = False, gradient_clipping: float | None = None,
                           offload_optimizer: bool = False, offload_params: bool = False, on_gpu: bool = False,
                           optimizer: Mapping[str, Any] | None = None,
                           overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A DeepSpeed config dict (see the module docstring); ``overrides`` are merged in last.

    ``optimizer`` (``{"type": "AdamW", "params": {...}}``) is required with ``offload_optimizer``,
    where DeepSpeed must build its own CPU optimizer; otherwise the caller passes a torch optimizer.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1-3")
    if offload_optimizer and optimizer is None:
        raise ValueError("offload_optimizer needs an optimizer section (DeepSpeed builds its CPU Adam)")
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_bucket_size=5e7)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(gradient_clipping or 0.0),
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,   # the loop reports metrics; keep DeepSpeed's own logging quiet
        "wall_clock_breakdown": False,
    }
    if optimizer is not None:
        config["optimizer"] = dict(optimizer)
    return merge_config(config, overrides or {})


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``overrides`` wins, nested sections are merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class MemoryEstimate:
    """Model-state memory (parameters, gradients, optimizer) of one ZeRO setup, in bytes."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    gpus_per_node: int
    nodes: int
    per_gpu_bytes: int
    per_node_cpu_bytes: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_gpu_gib"] = round(self.per_gpu_bytes / 2**30, 2)
        data["per_node_cpu_gib"] = round(self.per_node_cpu_bytes / 2**30, 2)
        return data


def estimate_model_states_memory(*, total_params: int, largest_layer_params: int, stage: int, gpus_per_node: int = 1,
                                 nodes: int = 1, offload_optimizer: bool = False, offload_params: bool = False,
                                 buffer_factor: float = 1.5) -> MemoryEstimate:
    """Per-GPU and per-node CPU memory for mixed-precision Adam training under ZeRO ``stage``.

    Stages 2 and 3 call DeepSpeed's estimators (``zero_init`` assumed for stage 3). Stages 0 and 1
    use the same byte counts as DeepSpeed's stage-2 estimator: 2 bytes of 16-bit parameters + 2 of
    16-bit gradients + 16 of fp32 gradients, master weights and Adam moments, the last 16
    partitioned over all GPUs at stage 1 (the ZeRO paper's optimizer-state partitioning).
    """
    total_gpus = gpus_per_node * nodes
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, nodes,
                                                         cpu_offload=offload_optimizer,
                                                         additional_buffer_factor=buffer_factor)
        source = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    elif stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, gpus_per_node, nodes,
                                                            cpu_offload=offload_optimizer,
                                                            cpu_offload_params=offload_params, zero_init=True,
                                                            additional_buffer_factor=buffer_factor)
        source = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    elif stage in (0, 1):
        if offload_optimizer and stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1-3")
        if offload_optimizer:  # as DeepSpeed's stage-2 offload estimate, with unpartitioned 16-bit gradients
            gpu = 4 * total_params
            cpu = total_params * max(4 * total_gpus, 16) * buffer_factor
        else:
            gpu = 4 * total_params + int(16 * total_params / (total_gpus if stage == 1 else 1))
            cpu = total_params * 4 * gpus_per_node * buffer_factor
        source = "ZeRO paper accounting with DeepSpeed's byte counts (DeepSpeed has no stage 0/1 estimator)"
    else:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    return MemoryEstimate(stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                          gpus_per_node=gpus_per_node, nodes=nodes, per_gpu_bytes=int(gpu),
                          per_node_cpu_bytes=int(cpu), source=source)


def count_parameters(hf_config: Any, lora: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Total, largest-layer and trainable parameter counts of ``AutoModel.from_config(hf_config)``.

    The model is built on the ``meta`` device, so even a 7B configuration costs no memory, and
    like :class:`~babelforge.models.Embedder` loads it: BERT-family encoders without their unused
    NSP pooler. ``lora`` (``{"r": 16, "target_modules": [...]}``) counts the adapters as the
    trainable part. Tied parameters count once.
    """
    import torch
    from transformers import AutoModel

    extra = {"add_pooling_layer": False} if hf_config.model_type in _POOLER_MODEL_TYPES else {}
    with torch.device("meta"):
        model = AutoModel.from_config(hf_config, **extra)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    trainable = total
    if lora is not None:
        targets = set(lora["target_modules"])
        trainable = sum(lora["r"] * (module.in_features + module.out_features) for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return {"total": total, "largest_layer": largest, "trainable": trainable}
