"""The interface every generation backend implements.

A backend turns a Ray Dataset of chat requests into generations (:meth:`GenerationBackend.apply`):

- input columns: ``messages`` (JSON list of ``{"role", "content"}`` chat messages, consumed),
  ``temperature`` (float) and ``sampling_seed`` (int), plus any others, which are carried through;
- added columns: ``generated_text`` (str), ``prompt_tokens`` and ``completion_tokens`` (int) and
  ``generation_error`` (str, empty when the request succeeded).

``top_p`` and ``max_new_tokens`` come from the backend's :class:`SamplingSettings`. Backends that
run in-process (transformers, OpenAI HTTP) derive from :class:`ActorPoolBackend`: their
:class:`LocalGenerator` also works without Ray, and ``apply`` runs it in a Ray Data actor pool::

    >>> backend = make_backend(settings.backend, settings.sampling)             # doctest: +SKIP
    >>> generator = backend.create_generator()                                 # doctest: +SKIP
    >>> generator.generate([GenerationRequest(messages, temperature=0.7, seed=1)])[0].text  # doctest: +SKIP
    '{"query": ...}'
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from babelforge.errors import ConfigError
from babelforge.synth.config import SamplingSettings

__all__ = ["GenerationRequest", "Generation", "LocalGenerator", "GenerationBackend", "ActorPoolBackend",
           "GENERATION_COLUMNS"]

GENERATION_COLUMNS = ("generated_text", "prompt_tokens", "completion_tokens", "generation_error")


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion to sample."""

    messages: list[dict[str, str]]
    temperature: float
    seed: int


@dataclass(frozen=True)
class Generation:
    """A backend's answer; ``error`` is set (and ``text`` may be empty) when the request failed."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


class LocalGenerator(ABC):
    """Generates in the current process (loaded once per Ray actor)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One generation per request, in order; failures are reported in ``Generation.error``."""


class GenerationBackend(ABC):
    """A way to run an instruct LLM over a Ray Dataset of chat requests."""

    name: ClassVar[str]

    def __init__(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling

    @property
    @abstractmethod
    def model(self) -> str:
        """The model's name as recorded with each example."""

    @abstractmethod
    def apply(self, ds: Any) -> Any:
        """Lazily add :data:`GENERATION_COLUMNS` to ``ds`` (a ``ray.data.Dataset``)."""


class GenerateBatch:
    """Ray Data callable class: one :class:`LocalGenerator` per actor."""

    def __init__(self, backend: "ActorPoolBackend") -> None:
        self.generator = backend.create_generator()

    def __call__(self, batch: pa.Table) -> pa.Table:
        requests = [GenerationRequest(json.loads(m), float(t), int(s)) for m, t, s in
                    zip(batch["messages"].to_pylist(), batch["temperature"].to_pylist(),
                        batch["sampling_seed"].to_pylist())]
        generations = self.generator.generate(requests) if requests else []
        columns = {"generated_text": pa.array([g.text for g in generations], pa.string()),
                   "prompt_tokens": pa.array([g.prompt_tokens for g in generations], pa.int64()),
                   "completion_tokens": pa.array([g.completion_tokens for g in generations], pa.int64()),
                   "generation_error": pa.array([g.error for g in generations], pa.string())}
        batch = batch.drop_columns(["messages"])
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch


class ActorPoolBackend(GenerationBackend):
    """A backend whose :class:`LocalGenerator` runs in a pool of ``actors`` Ray Data actors,
    each reserving one whole CPU (and ``gpus_per_actor`` GPUs)."""

    def __init__(self, sampling: SamplingSettings, *, batch_size: int, actors: int,
                 gpus_per_actor: float = 0) -> None:
        super().__init__(sampling)
        self.batch_size = batch_size
        self.actors = actors
        self.gpus_per_actor = gpus_per_actor

    @abstractmethod
    def create_generator(self) -> LocalGenerator:
        """Load the generator (model, client) in the calling process."""

    def apply(self, ds: Any) -> Any:
        import ray

        from babelforge.utils.ray_env import cluster_cpus

        cpus = cluster_cpus()
        if self.actors > max(1, cpus - 1):
            raise ConfigError(f"synth.backend.actors={self.actors} does not fit a cluster with {cpus} CPUs "
                              "(each actor takes one CPU and one stays free for Ray Data's own tasks)")
        return ds.map_batches(GenerateBatch, fn_constructor_kwargs={"backend": self}, batch_size=self.batch_size,
                              batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=self.actors),
                              num_cpus=1, num_gpus=self.gpus_per_actor or None)
