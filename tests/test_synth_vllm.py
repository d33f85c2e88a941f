"""The vLLM backend without vLLM: its ray.data.llm config, its processor and its row mapping.

vLLM is not installable on these machines, so the engine itself never runs here; everything the
backend hands to ``ray.data.llm`` is checked instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babelforge.config import load_config
from babelforge.synth.backends import make_backend
from babelforge.synth.backends.vllm_ray import vllm_postprocess, vllm_preprocess
from babelforge.synth.config import SamplingSettings, SynthJobConfig, VLLMBackendSettings
from babelforge.synth.prompts import RESPONSE_JSON_SCHEMA

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"


def _backend(**settings):
    return make_backend(VLLMBackendSettings(kind="vllm", model_source="Qwen/Qwen3-8B", **settings),
                        SamplingSettings(top_p=0.9, max_new_tokens=300))


def test_processor_config_carries_parallelism_and_engine_settings():
    config = _backend(tensor_parallel_size=2, pipeline_parallel_size=1, concurrency=(1, 4), batch_size=32,
                      max_model_len=4096, accelerator_type="H100", chat_template_kwargs={"enable_thinking": False},
                      engine_kwargs={"enable_prefix_caching": True}).processor_config()
    assert config.model_source == "Qwen/Qwen3-8B" and config.concurrency == (1, 4) and config.batch_size == 32
    assert config.accelerator_type == "H100"
    assert {k: config.engine_kwargs[k] for k in ("tensor_parallel_size", "max_model_len", "enable_prefix_caching",
                                                 "gpu_memory_utilization")} == \
        {"tensor_parallel_size": 2, "max_model_len": 4096, "enable_prefix_caching": True,
         "gpu_memory_utilization": 0.9}
    assert config.chat_template_stage == {"chat_template_kwargs": {"enable_thinking": False}}


def test_processor_builds_with_the_engine_stage(ray_local, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = _backend(tensor_parallel_size=2, concurrency=3, batch_size=16,
                         chat_template_kwargs={"enable_thinking": False}).build_processor(["id", "task"])
    assert processor.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage",
                                            "DetokenizeStage"]
    engine = processor.get_stage_by_name("vLLMEngineStage")
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 2
    assert engine.fn_constructor_kwargs["batch_size"] == 16
    assert engine.map_batches_kwargs["compute"].max_size == 3
    chat = processor.get_stage_by_name("ChatTemplateStage")
    assert chat.fn_constructor_kwargs["chat_template_kwargs"] == {"enable_thinking": False}


def test_rows_map_to_vllm_requests_and_back():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    row = {"id": "de-qa-00001", "task": "qa", "messages": json.dumps(messages), "temperature": 0.9,
           "sampling_seed": 42}
    request = vllm_preprocess(row, top_p=0.9, max_tokens=300, json_schema=json.dumps(RESPONSE_JSON_SCHEMA))
    assert request["messages"] == messages
    assert request["sampling_params"] == {"temperature": 0.9, "top_p": 0.9, "max_tokens": 300, "seed": 42,
                                          "structured_outputs": {"json": json.dumps(RESPONSE_JSON_SCHEMA)}}
    assert "structured_outputs" not in vllm_preprocess(row, top_p=1, max_tokens=1, json_schema=None)["sampling_params"]

    engine_output = {**row, **request, "prompt": "<chat>", "generated_text": '{"query": "q"}',
                     "num_input_tokens": 120, "num_generated_tokens": 17, "generated_tokens": [1, 2]}
    assert vllm_postprocess(engine_output, carry=("id", "task")) == {
        "id": "de-qa-00001", "task": "qa", "generated_text": '{"query": "q"}', "prompt_tokens": 120,
        "completion_tokens": 17, "generation_error": ""}


def test_gpu_job_config_is_valid():
    config = load_config(CONFIGS / "synth_vllm.yaml", SynthJobConfig)
    backend = config.synth.backend
    assert backend.kind == "vllm" and backend.tensor_parallel_size >= 1 and config.synth.quota_per_language == 4000
    assert len(config.synth.languages) >= 10 and config.synth.tasks == ["short_long", "long_long", "short_short",
                                                                        "qa", "bitext"]


@pytest.mark.parametrize("name", ["synth.yaml", "synth_vllm.yaml"])
def test_job_configs_load(name):
    assert load_config(CONFIGS / name, SynthJobConfig).synth.max_attempts >= 1
