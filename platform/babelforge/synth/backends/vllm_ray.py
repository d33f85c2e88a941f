"""Generation with vLLM engines through ``ray.data.llm`` (GPU clusters).

:meth:`VLLMRayBackend.processor_config` builds a ``vLLMEngineProcessorConfig`` from the settings
(``concurrency`` engine replicas of ``tensor_parallel_size`` x ``pipeline_parallel_size`` GPUs
each) and :meth:`VLLMRayBackend.build_processor` wires it with ``build_processor``:
:func:`vllm_preprocess` turns a request row into ``messages`` and per-row ``sampling_params``
(temperature, seed, and the example's JSON schema as ``structured_outputs`` so decoding can only
produce the expected object); :func:`vllm_postprocess` maps vLLM's output columns onto the
backend contract (``generated_text``, ``prompt_tokens``, ``completion_tokens``,
``generation_error``). An engine error fails the round (Ray Data LLM's continue-on-error rows
bypass postprocessing with a different set of columns); the stage then resumes from its last
committed shard.

Building the processor needs neither vLLM nor a GPU; running it needs both::

    >>> settings = VLLMBackendSettings(kind="vllm", model_source="Qwen/Qwen3-8B", tensor_parallel_size=2,
    ...                                concurrency=4)
    >>> config = VLLMRayBackend(settings, SamplingSettings()).processor_config()
    >>> config.engine_kwargs["tensor_parallel_size"], config.concurrency
    (2, 4)
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Sequence

from babelforge.synth.backends.base import GenerationBackend
from babelforge.synth.config import SamplingSettings, VLLMBackendSettings
from babelforge.synth.prompts import RESPONSE_JSON_SCHEMA

__all__ = ["VLLMRayBackend", "vllm_preprocess", "vllm_postprocess"]


def vllm_preprocess(row: dict[str, Any], *, top_p: float, max_tokens: int, json_schema: str | None) -> dict[str, Any]:
    """A request row -> the chat messages and sampling parameters vLLM's stages read."""
    params: dict[str, Any] = {"temperature": float(row["temperature"]), "top_p": top_p, "max_tokens": max_tokens,
                              "seed": int(row["sampling_seed"])}
    if json_schema:
        params["structured_outputs"] = {"json": json_schema}
    return {"messages": json.loads(row["messages"]), "sampling_params": params}


def vllm_postprocess(row: dict[str, Any], *, carry: Sequence[str]) -> dict[str, Any]:
    """vLLM's output row -> the carried request columns plus the backend's generation columns."""
    out = {column: row[column] for column in carry}
    out.update(generated_text=str(row.get("generated_text") or ""),
               prompt_tokens=int(row.get("num_input_tokens") or 0),
               completion_tokens=int(row.get("num_generated_tokens") or 0),
               generation_error="")
    return out


class VLLMRayBackend(GenerationBackend):
    """``synth.backend.kind: vllm``."""

    name = "vllm"

    def __init__(self, settings: VLLMBackendSettings, sampling: SamplingSettings) -> None:
        super().__init__(sampling)
        self.settings = settings

    @property
    def model(self) -> str:
        return self.settings.model_source

    def processor_config(self) -> Any:
        """The ``ray.data.llm.vLLMEngineProcessorConfig`` for these settings."""
        from ray.data.llm import vLLMEngineProcessorConfig

        s = self.settings
        engine_kwargs = {"tensor_parallel_size": s.tensor_parallel_size,
                         "pipeline_parallel_size": s.pipeline_parallel_size,
                         "max_model_len": s.max_model_len, "gpu_memory_utilization": s.gpu_memory_utilization,
                         **s.engine_kwargs}
        extra: dict[str, Any] = {}
        if s.chat_template_kwargs:
            extra["chat_template_stage"] = {"chat_template_kwargs": s.chat_template_kwargs}
        return vLLMEngineProcessorConfig(model_source=s.model_source, engine_kwargs=engine_kwargs,
                                         concurrency=s.concurrency, batch_size=s.batch_size,
                                         accelerator_type=s.accelerator_type, **extra)

    def build_processor(self, carry: Sequence[str]) -> Any:
        """A ``ray.data.llm`` processor whose output keeps the ``carry`` columns."""
        from ray.data.llm import build_processor

        schema = json.dumps(RESPONSE_JSON_SCHEMA) if self.settings.structured_output else None
        return build_processor(
            self.processor_config(),
            preprocess=partial(vllm_preprocess, top_p=self.sampling.top_p, max_tokens=self.sampling.max_new_tokens,
                               json_schema=schema),
            postprocess=partial(vllm_postprocess, carry=tuple(carry)))

    def apply(self, ds: Any) -> Any:
        return self.build_processor([c for c in ds.columns() if c != "messages"])(ds)
