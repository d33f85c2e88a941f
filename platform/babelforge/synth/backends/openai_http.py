"""Generation through an OpenAI-compatible ``/v1/chat/completions`` server.

Works with ``vllm serve``, TGI, llama.cpp's server or a hosted API. Each Ray Data actor keeps one
``httpx`` client and sends up to ``max_concurrent_requests`` requests at a time. Timeouts,
connection errors and HTTP 408/429/5xx are retried with exponential backoff (``max_retries``);
a request that still fails becomes a generation with ``error`` set, which the stage retries
and finally quarantines as ``backend_error``: one bad request never stops the stage.

(``ray.data.llm.HttpRequestProcessorConfig`` was not used: it raises on a request that exhausts
its retries, failing the whole pipeline, and returns the raw response objects.)

    >>> settings = OpenAIBackendSettings(kind="openai", base_url="http://127.0.0.1:8000/v1", model="qwen")
    >>> backend = OpenAIHTTPBackend(settings, SamplingSettings())
    >>> payload = backend.create_generator().payload(GenerationRequest([{"role": "user", "content": "Hi"}], 0.7, 3))
    >>> payload["model"], payload["seed"], payload["response_format"]["type"]
    ('qwen', 3, 'json_schema')
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from babelforge.synth.backends.base import ActorPoolBackend, Generation, GenerationRequest, LocalGenerator
from babelforge.synth.config import OpenAIBackendSettings, SamplingSettings
from babelforge.synth.prompts import RESPONSE_JSON_SCHEMA

__all__ = ["OpenAIHTTPBackend", "OpenAIHTTPGenerator"]

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


class OpenAIHTTPGenerator(LocalGenerator):
    """A pooled HTTP client for one server."""

    def __init__(self, settings: OpenAIBackendSettings, sampling: SamplingSettings) -> None:
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=settings.base_url.rstrip("/"), headers=headers,
                                   timeout=settings.timeout_s,
                                   limits=httpx.Limits(max_connections=settings.max_concurrent_requests))
        self.pool = ThreadPoolExecutor(settings.max_concurrent_requests, thread_name_prefix="synth-http")
        self.settings = settings
        self.sampling = sampling

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "messages": request.messages,
                                "temperature": request.temperature, "top_p": self.sampling.top_p,
                                "max_tokens": self.sampling.max_new_tokens, "seed": request.seed}
        if self.settings.json_mode:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "synthetic_example", "schema": RESPONSE_JSON_SCHEMA, "strict": True}}
        return body

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(self.pool.map(self._complete, requests))

    def _complete(self, request: GenerationRequest) -> Generation:
        error = ""
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                time.sleep(min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (attempt - 1)))
            try:
                response = self.client.post("/chat/completions", json=self.payload(request))
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in _RETRYABLE_STATUS:
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                return Generation("", error=f"HTTP {response.status_code}: {response.text[:300]}")
            return _generation_from(response)
        return Generation("", error=error)


def _generation_from(response: httpx.Response) -> Generation:
    try:
        body = response.json()
        text = body["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        return Generation("", error=f"unexpected response: {response.text[:300]}")
    usage = body.get("usage") or {}
    return Generation(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0))


class OpenAIHTTPBackend(ActorPoolBackend):
    """``synth.backend.kind: openai``."""

    name = "openai"

    def __init__(self, settings: OpenAIBackendSettings, sampling: SamplingSettings) -> None:
        super().__init__(sampling, batch_size=settings.batch_size, actors=settings.actors)
        self.settings = settings

    @property
    def model(self) -> str:
        return self.settings.model

    def create_generator(self) -> OpenAIHTTPGenerator:
        return OpenAIHTTPGenerator(self.settings, self.sampling)
