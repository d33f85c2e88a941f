"""Embedding text columns of a Ray Dataset with an actor pool (one model replica per actor).

Shared by evaluation, ranking-consistency filtering and hard-negative mining. Each actor loads an
:class:`~babelforge.models.Embedder` once and embeds batches; on a GPU cluster there is one actor
per GPU, on CPU a small pool whose torch threads cover the cores Ray gave it.

    >>> ds = ray.data.from_items([{"text": "hello"}, {"text": "bonjour"}])     # doctest: +SKIP
    >>> ds = embed_dataset(ds, "models/me5-small", prompt_name="query")       # doctest: +SKIP
    >>> ds.take(1)[0]["embedding"].shape                                        # doctest: +SKIP
    (384,)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from babelforge.utils import ray_env  # noqa: F401  (sets loopback before ray is imported)

log = logging.getLogger(__name__)

__all__ = ["EmbedBatch", "ActorPlan", "plan_actors", "embed_dataset", "encode_texts"]


@dataclass(frozen=True)
class ActorPlan:
    """How many embedding actors to start and what each one reserves."""

    actors: int
    num_gpus: float
    num_cpus: float
    torch_threads: int

    def describe(self) -> str:
        dev = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU, {self.torch_threads} torch threads"
        return f"{self.actors} embedding actor(s), each {dev}"


def plan_actors(actors: int | None = None, gpus_per_actor: float | None = None) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs (or ``gpus_per_actor`` is set); otherwise CPU
    actors that leave a core free. ``gpus_per_actor=0`` forces CPU actors on a GPU cluster.

    Whole CPUs only: Ray Data stalls when an actor pool reserves fractional or more CPUs than the
    cluster has left for its read and write tasks.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    # An explicit gpus_per_actor requests GPU actors even while no GPU node is up, so an
    # autoscaling cluster whose GPU groups start at zero scales them up.
    if gpus_per_actor or (gpus and gpus_per_actor != 0):
        per = gpus_per_actor or 1.0
        n = actors or max(1, int(gpus // per))
        return ActorPlan(actors=n, num_gpus=per, num_cpus=1, torch_threads=1)
    n = actors or max(1, (cpus - 1) // 2)
    if n > max(1, cpus - 1):
        raise ValueError(f"{n} CPU embedding actors do not fit a cluster with {cpus} CPUs "
                         "(one CPU stays free for Ray Data's read/write tasks)")
    threads = max(1, cpus // n)
    return ActorPlan(actors=n, num_gpus=0, num_cpus=1, torch_threads=threads)


class EmbedBatch:
    """Ray Data callable class: adds ``output_column`` (float32 vectors) to each batch.

    ``prompt_name`` applies one instruction to every row; ``prompt_column`` instead takes the
    prompt name per row (so queries and passages can share one pass).
    """

    def __init__(self, model_path: str, text_column: str = "text", output_column: str = "embedding",
                 prompt_name: str | None = None, prompt_column: str | None = None, batch_size: int = 64,
                 dim: int | None = None, device: str = "auto", dtype: str | None = None,
                 torch_threads: int | None = None) -> None:
        import torch

        from babelforge.models import Embedder, inference_placement

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        device, dtype = inference_placement(device, dtype)
        self.model = Embedder.from_pretrained(model_path, device=device, dtype=dtype)
        self.text_column = text_column
        self.output_column = output_column
        self.prompt_name = prompt_name
        self.prompt_column = prompt_column
        self.batch_size = batch_size
        self.dim = dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.text_column]]
        dim = self.dim or self.model.hidden_size
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if self.prompt_column:
            prompts = np.asarray([str(p) if p is not None else "" for p in batch[self.prompt_column]])
            for name in np.unique(prompts):
                rows = np.nonzero(prompts == name)[0]
                out[rows] = self.model.encode([texts[i] for i in rows], prompt_name=name or None,
                                              batch_size=self.batch_size, dim=self.dim)
        elif texts:
            out[:] = self.model.encode(texts, prompt_name=self.prompt_name, batch_size=self.batch_size, dim=self.dim)
        batch[self.output_column] = list(out) if len(out) else np.zeros((0, dim), dtype=np.float32)
        return batch


def embed_dataset(ds: Any, model_path: str, *, text_column: str = "text", output_column: str = "embedding",
                  prompt_name: str | None = None, prompt_column: str | None = None, batch_size: int = 64,
                  rows_per_call: int = 256, dim: int | None = None, actors: int | None = None,
                  gpus_per_actor: float | None = None, dtype: str | None = None) -> Any:
    """Lazily add embeddings to a Ray Dataset (nothing runs until the dataset is consumed)."""
    import ray

    plan = plan_actors(actors, gpus_per_actor)
    log.info("embedding %r with %s", text_column, plan.describe())
    return ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs=dict(model_path=str(model_path), text_column=text_column, output_column=output_column,
                                   prompt_name=prompt_name, prompt_column=prompt_column, batch_size=batch_size,
                                   dim=dim, device="cuda" if plan.num_gpus else "cpu", dtype=dtype,
                                   torch_threads=plan.torch_threads),
        batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        num_gpus=plan.num_gpus or None,
        num_cpus=plan.num_cpus,
        batch_format="numpy",
    )


def encode_texts(texts: Sequence[str], model_path: str, prompt_name: str | None = None, *,
                 prompt_names: Sequence[str | None] | None = None, batch_size: int = 64,
                 actors: int | None = None, gpus_per_actor: float | None = None,
                 dtype: str | None = None) -> np.ndarray:
    """Embed an in-memory list through the Ray actor pool; rows come back in input order.

    ``prompt_names`` (one per text) overrides ``prompt_name`` to mix queries and passages.
    """
    import ray

    if prompt_names is not None and len(prompt_names) != len(texts):
        raise ValueError(f"prompt_names has {len(prompt_names)} entries for {len(texts)} texts")
    if not len(texts):
        return np.zeros((0, 0), dtype=np.float32)
    rows = [{"row": i, "text": t, "prompt": (prompt_names[i] if prompt_names is not None else prompt_name) or ""}
            for i, t in enumerate(texts)]
    plan = plan_actors(actors, gpus_per_actor)
    # Enough blocks to keep every actor busy, few enough that scheduling overhead stays small.
    blocks = max(plan.actors * 4, min(64, len(rows) // 256 + 1))
    ds = ray.data.from_items(rows, override_num_blocks=min(blocks, len(rows)))
    ds = embed_dataset(ds, model_path, prompt_column="prompt", batch_size=batch_size, actors=plan.actors,
                       gpus_per_actor=gpus_per_actor, dtype=dtype)
    out: np.ndarray | None = None
    for batch in ds.select_columns(["row", "embedding"]).iter_batches(batch_size=4096, batch_format="numpy"):
        emb = np.stack(batch["embedding"]).astype(np.float32, copy=False)
        if out is None:
            out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        out[batch["row"]] = emb
    assert out is not None
    return out
