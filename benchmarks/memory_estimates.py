"""Per-GPU model-state memory of every training preset, from DeepSpeed's own estimators.

For each GPU preset ``jobs/configs/train_*.yaml`` (base models recorded in
:data:`babelforge.train.presets.ARCHITECTURES`), the model is built from its published
``config.json`` values on the ``meta`` device (no download, no memory), its parameters are
counted, and DeepSpeed's estimator (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``, what ``estimate_zero{2,3}_model_states_mem_needs_all_cold``
print) gives the memory for the preset's ZeRO stage, offload and GPU count. The alternatives
(ZeRO-2 / ZeRO-3 with and without offload on the same GPUs) are listed too, and LoRA variants for
presets that offer LoRA. Activations are not included: they scale with the chunk size (GradCache)
and sequence length, and gradient checkpointing cuts them to about one layer's worth::

    PYTHONPATH=platform python benchmarks/memory_estimates.py     # writes benchmarks/results/memory_estimates.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from babelforge.config import load_config
from babelforge.train.config import TrainConfig
from babelforge.train.deepspeed_config import count_parameters, estimate_model_states_memory
from babelforge.train.presets import architecture, preset_memory

ROOT = Path(__file__).resolve().parents[1]
LORA_PRESETS = ("train_qwen2_0.5b.yaml", "train_qwen2_1.5b.yaml")
ALTERNATIVES = [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]


def alternatives(cfg: TrainConfig) -> list[dict[str, Any]]:
    counts = count_parameters(architecture(cfg.model.base))
    return [estimate_model_states_memory(total_params=counts["total"], largest_layer_params=counts["largest_layer"],
                                         stage=stage, gpus_per_node=cfg.scaling.num_workers,
                                         offload_optimizer=optimizer, offload_params=params).to_dict()
            for stage, optimizer, params in ALTERNATIVES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=str(ROOT / "jobs" / "configs"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_estimates.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for path in sorted(Path(args.configs).glob("train_*.yaml")):
        cfg = load_config(path, TrainConfig)
        if not cfg.scaling.use_gpu:
            print(f"{path.name}: a CPU preset, skipped")
            continue
        entry = {"preset": preset_memory(cfg), "alternatives": alternatives(cfg)}
        if path.name in LORA_PRESETS:
            entry["lora_r16"] = preset_memory(load_config(path, TrainConfig, ["model.lora.r=16"]))
        results[path.name] = entry
        preset = entry["preset"]
        print(f"{path.name}: {preset['parameters']['total'] / 1e6:.0f}M params, {preset['num_workers']} worker(s), "
              f"ZeRO-{preset['stage']} offload opt={preset['offload_optimizer']} params={preset['offload_params']}: "
              f"{preset['per_gpu_gib']} GiB per GPU, {preset['per_node_cpu_gib']} GiB CPU per node")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
