"""Actor planning for Ray Data embedding, and order-preserving encoding through the actor pool."""

from __future__ import annotations

import numpy as np
import pytest

from babelforge import encoding
from babelforge.models import Embedder


@pytest.fixture
def cluster(monkeypatch):
    def set_resources(**resources):
        import ray

        monkeypatch.setattr(ray, "cluster_resources", lambda: resources)

    return set_resources


def test_one_gpu_actor_per_gpu(cluster):
    cluster(CPU=32, GPU=4)
    plan = encoding.plan_actors()
    assert (plan.actors, plan.num_gpus, plan.num_cpus) == (4, 1.0, 1)


def test_explicit_gpus_request_gpu_actors_before_gpu_nodes_exist(cluster):
    cluster(CPU=8)   # an autoscaling cluster whose GPU workers start at zero
    plan = encoding.plan_actors(actors=2, gpus_per_actor=1)
    assert (plan.actors, plan.num_gpus) == (2, 1)


def test_cpu_actors_leave_a_core_for_ray_data_and_use_whole_cpus(cluster):
    cluster(CPU=2)
    plan = encoding.plan_actors()
    assert (plan.actors, plan.num_gpus, plan.num_cpus, plan.torch_threads) == (1, 0, 1, 2)
    cluster(CPU=9, GPU=1)
    assert encoding.plan_actors(gpus_per_actor=0).num_gpus == 0   # forced CPU on a GPU cluster
    cluster(CPU=2)
    with pytest.raises(ValueError, match="do not fit a cluster with 2 CPUs"):
        encoding.plan_actors(actors=2)


def test_encode_texts_returns_rows_in_input_order_with_per_row_prompts(ray_local, tiny_encoder_dir):
    texts = [f"Satz Nummer {i} " + "lang " * (i % 7) for i in range(40)]
    prompts = ["query" if i % 3 else "passage" for i in range(40)]
    got = encoding.encode_texts(texts, str(tiny_encoder_dir), prompt_names=prompts, batch_size=8)
    model = Embedder.from_pretrained(tiny_encoder_dir)
    expected = np.stack([model.encode([t], prompt_name=p)[0] for t, p in zip(texts, prompts)])
    np.testing.assert_allclose(got, expected, atol=2e-5)
