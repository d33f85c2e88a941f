"""Generation backends behind one interface (:class:`GenerationBackend`).

- ``transformers``: in-process generation in Ray Data actors (CPU default, tests);
- ``openai``: any OpenAI-compatible chat-completions server, over HTTP;
- ``vllm``: vLLM engines through ``ray.data.llm`` on GPU clusters.

    >>> from babelforge.synth.config import OpenAIBackendSettings, SamplingSettings
    >>> make_backend(OpenAIBackendSettings(kind="openai", base_url="http://127.0.0.1:8000/v1", model="m"),
    ...              SamplingSettings()).name
    'openai'
"""

from __future__ import annotations

from babelforge.synth.backends.base import (GENERATION_COLUMNS, ActorPoolBackend, Generation, GenerationBackend,
                                            GenerationRequest, LocalGenerator)
from babelforge.synth.config import (BackendSettings, OpenAIBackendSettings, SamplingSettings,
                                     TransformersBackendSettings, VLLMBackendSettings)

__all__ = ["GenerationBackend", "ActorPoolBackend", "LocalGenerator", "GenerationRequest", "Generation",
           "GENERATION_COLUMNS", "make_backend"]


def make_backend(settings: BackendSettings, sampling: SamplingSettings) -> GenerationBackend:
    """The backend named by ``settings.kind``."""
    if isinstance(settings, TransformersBackendSettings):
        from babelforge.synth.backends.transformers_backend import TransformersBackend

        return TransformersBackend(settings, sampling)
    if isinstance(settings, OpenAIBackendSettings):
        from babelforge.synth.backends.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(settings, sampling)
    if isinstance(settings, VLLMBackendSettings):
        from babelforge.synth.backends.vllm_ray import VLLMRayBackend

        return VLLMRayBackend(settings, sampling)
    raise TypeError(f"unknown backend settings {type(settings).__name__}")
