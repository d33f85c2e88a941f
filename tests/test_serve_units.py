"""Serving building blocks without Ray: token-budget batcher, API-key auth, config files, wire formats."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from babelforge.errors import ConfigError
from babelforge.serve.auth import ApiKeyAuth, load_api_keys
from babelforge.serve.batcher import BatchLimits, BatchReport, TokenBudgetBatcher, plan_forward_passes
from babelforge.serve.config import AuthConfig, ServeConfig, load_serve_config
from babelforge.serve.protocol import (APIError, TextInputs, embeddings_response, parse_embed_request,
                                       parse_embeddings_request)
from babelforge.serve.service import EmbeddingService

REPO = Path(__file__).resolve().parents[1]


def _fingerprint_encode(texts: list[str]) -> np.ndarray:
    """A vector that identifies its text, so misrouted results are detected."""
    return np.array([[float(sum(map(ord, t))), float(len(t))] for t in texts], dtype=np.float32)


def _run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- batcher
def test_concurrent_requests_share_a_batch_and_get_their_own_rows_back():
    reports: list[BatchReport] = []

    async def main():
        batcher = TokenBudgetBatcher(_fingerprint_encode, BatchLimits(64, 10_000, wait_timeout_s=0.05),
                                     on_batch=reports.append)
        requests = [[f"req{r}-text{i}" for i in range(r + 1)] for r in range(6)]
        results = await asyncio.gather(*(batcher.embed(t, [len(x) for x in t]) for t in requests))
        batcher.close()
        return requests, results

    requests, results = _run(main())
    for texts, vectors in zip(requests, results):
        np.testing.assert_array_equal(vectors, _fingerprint_encode(texts))
    assert len(reports) == 1 and reports[0].requests == 6 and reports[0].inputs == 21


def test_batches_respect_count_and_token_budgets():
    reports: list[BatchReport] = []
    seen_pass_sizes: list[int] = []

    def encode(texts):
        seen_pass_sizes.append(len(texts))
        return _fingerprint_encode(texts)

    async def main():
        batcher = TokenBudgetBatcher(encode, BatchLimits(max_batch_size=4, max_batch_tokens=100, wait_timeout_s=0.01),
                                     on_batch=reports.append)
        many_short = [f"s{i}" for i in range(10)]
        few_long = ["L1", "L2", "L3"]
        a, b = await asyncio.gather(batcher.embed(many_short, [5] * 10), batcher.embed(few_long, [60] * 3))
        batcher.close()
        return many_short, few_long, a, b

    many_short, few_long, a, b = _run(main())
    np.testing.assert_array_equal(a, _fingerprint_encode(many_short))
    np.testing.assert_array_equal(b, _fingerprint_encode(few_long))
    assert sum(r.inputs for r in reports) == 13
    assert all(r.inputs <= 4 for r in reports)
    # A batch only exceeds the token budget when a single text does on its own.
    assert all(r.tokens <= 100 or r.inputs == 1 for r in reports)
    assert max(seen_pass_sizes) <= 4


def test_a_lone_request_is_served_after_the_wait_timeout():
    async def main():
        batcher = TokenBudgetBatcher(_fingerprint_encode, BatchLimits(64, 10_000, wait_timeout_s=0.05))
        started = time.perf_counter()
        await batcher.embed(["alone"], [3])
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed

    assert 0.04 <= _run(main()) < 1.0


def test_event_loop_answers_while_a_batch_computes():
    def slow_encode(texts):
        time.sleep(0.4)  # like a long forward pass; runs in the batcher's thread
        return _fingerprint_encode(texts)

    async def main():
        batcher = TokenBudgetBatcher(slow_encode, BatchLimits(8, 1000, wait_timeout_s=0.0))
        ticks_during_batch = 0
        job = asyncio.ensure_future(batcher.embed(["x"], [1]))
        await asyncio.sleep(0.05)
        while not job.done():
            ticks_during_batch += 1  # a health check would be answered here
            await asyncio.sleep(0.02)
        await job
        batcher.close()
        return ticks_during_batch

    assert _run(main()) >= 5


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_serving():
    def encode(texts):
        if "boom" in texts:
            raise RuntimeError("CUDA out of memory")
        return _fingerprint_encode(texts)

    async def main():
        batcher = TokenBudgetBatcher(encode, BatchLimits(8, 1000, wait_timeout_s=0.0))
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.embed(["boom"], [1])
        ok = await batcher.embed(["fine"], [1])
        batcher.close()
        return ok

    np.testing.assert_array_equal(_run(main()), _fingerprint_encode(["fine"]))


def test_forward_passes_are_length_sorted_and_within_the_padded_budget():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 120, size=200).tolist()
    passes = plan_forward_passes(tokens, max_padded_tokens=512, max_rows=32)
    assert sorted(i for p in passes for i in p) == list(range(200))
    for p in passes:
        lengths = [tokens[i] for i in p]
        assert lengths == sorted(lengths, reverse=True)
        assert len(p) <= 32 and (len(p) == 1 or len(p) * lengths[0] <= 512)


# ----------------------------------------------------------------------------- service (no HTTP)
@pytest.mark.parametrize("arch,padding_side", [("xlm-roberta", "right"), ("qwen2", "left"), ("qwen2", "right")])
def test_service_equals_in_process_encode_across_padding_sides(arch, padding_side):
    from babelforge.models.tiny import build_tiny_embedder

    reference = build_tiny_embedder(arch, padding_side=padding_side, matryoshka_dims=[16, 8])
    served = build_tiny_embedder(arch, padding_side=padding_side, matryoshka_dims=[16, 8])
    config = ServeConfig(model_path=f"/models/tiny-{arch}", limits={"max_tokens": 24},
                         batching={"max_batch_tokens": 64, "batch_wait_timeout_s": 0.01})
    service = EmbeddingService(served, config)
    texts = ["Hallo Welt", "a much longer sentence with many more words than the others " * 3, "東京", "ok"]

    async def main():
        queries, passages = await asyncio.gather(
            service.embed(TextInputs(texts, "input", False), input_type="query", dimensions=8),
            service.embed(TextInputs(texts[::-1], "input", False), input_type="passage"))
        service.batcher.close()
        return queries, passages

    queries, passages = _run(main())
    np.testing.assert_allclose(queries.vectors, reference.encode(texts, prompt_name="query", dim=8, max_length=24),
                               atol=1e-5)
    np.testing.assert_allclose(passages.vectors, reference.encode(texts[::-1], prompt_name="passage", max_length=24),
                               atol=1e-5)
    assert queries.prompt_tokens == sum(min(n, 24) for n in reference.count_tokens(texts, prompt_name="query"))
    assert service.batcher.stats.max_requests_per_batch == 2


# ----------------------------------------------------------------------------- auth
def test_api_keys_come_from_env_and_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# rotated 2026-01\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("BF_TEST_KEYS", "env-key-1, env-key-2,")
    cfg = AuthConfig(api_keys_env="BF_TEST_KEYS", api_keys_file=str(keys_file))
    assert load_api_keys(cfg) == ["env-key-1", "env-key-2", "file-key-1", "file-key-2"]
    auth = ApiKeyAuth.from_config(cfg)
    assert auth is not None and "key-1" not in repr(auth)
    for key in ("env-key-2", "file-key-1"):
        auth.verify(f"Bearer {key}")
        auth.verify(f"bearer {key}")


@pytest.mark.parametrize("header,code", [(None, "missing_api_key"), ("", "missing_api_key"),
                                         ("Bearer wrong", "invalid_api_key"), ("Basic s3cret", "invalid_api_key"),
                                         ("Bearer ", "invalid_api_key"), ("s3cret", "invalid_api_key")])
def test_auth_rejects_missing_wrong_and_malformed_keys_without_echoing_them(header, code):
    with pytest.raises(APIError) as err:
        ApiKeyAuth(["s3cret"]).verify(header)
    assert (err.value.status, err.value.code, err.value.error_type) == (401, code, "authentication_error")
    assert "s3cret" not in err.value.message and "wrong" not in err.value.message


def test_auth_required_without_keys_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("BF_TEST_NO_KEYS", raising=False)
    assert ApiKeyAuth.from_config(AuthConfig(api_keys_env="BF_TEST_NO_KEYS")) is None
    with pytest.raises(ConfigError, match="BF_TEST_NO_KEYS"):
        ApiKeyAuth.from_config(AuthConfig(api_keys_env="BF_TEST_NO_KEYS", required=True))
    with pytest.raises(ConfigError, match="api_keys_file: .*missing.txt does not exist"):
        load_api_keys(AuthConfig(api_keys_env=None, api_keys_file=str(tmp_path / "missing.txt")))


# ----------------------------------------------------------------------------- config
def test_the_serve_config_file_is_valid_for_serve_and_for_babelforge_serve():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    cfg = load_serve_config(REPO / "serve" / "config.yaml", model_path="/models/x",
                            overrides=["batching.max_batch_size=32", "http.port=8123"])
    app = raw["applications"][0]
    deployment = app["deployments"][0]
    assert cfg.model_path == "/models/x" and cfg.batching.max_batch_size == 32
    assert (cfg.http.host, cfg.http.port) == (raw["http_options"]["host"], 8123)
    assert cfg.app_name == app["name"] and cfg.limits.overflow == app["args"]["limits"]["overflow"]
    assert cfg.autoscaling.model_dump() == deployment["autoscaling_config"]
    assert cfg.num_cpus == deployment["ray_actor_options"]["num_cpus"]
    assert cfg.deployment_options()["max_ongoing_requests"] == deployment["max_ongoing_requests"]


def test_serve_app_builder_validates_its_args():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_app", REPO / "serve" / "app.py")
    serve_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_app)
    serve_app.build_app({"model_path": "/models/x", "batching": {"max_batch_size": 8}})
    with pytest.raises(ConfigError, match="batching.max_batch: unknown key"):
        serve_app.build_app({"model_path": "/models/x", "batching": {"max_batch": 8}})


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="autoscaling.upscale_delay_s: unknown key"):
        load_serve_config(None, model_path="m", overrides=["autoscaling.upscale_delay_s=3"])
    with pytest.raises(ConfigError, match="min_replicas .3. is larger than max_replicas .1."):
        load_serve_config(None, model_path="m", overrides=["autoscaling.min_replicas=3"])
    with pytest.raises(ConfigError, match="limits.overflow"):
        load_serve_config(None, model_path="m", overrides=["limits.overflow=drop"])
    with pytest.raises(ConfigError, match="num_gpus > 0"):
        load_serve_config(None, model_path="m", overrides=["device=cuda"])
    two_apps = tmp_path / "two.yaml"
    two_apps.write_text(yaml.safe_dump({"applications": [{"import_path": "a:b"}, {"import_path": "c:d"}]}))
    with pytest.raises(ConfigError, match="exactly one application, found 2"):
        load_serve_config(two_apps)
    assert ServeConfig(model_path="/x/my-model/").served_model_name == "my-model"


# ----------------------------------------------------------------------------- wire formats
def test_response_matches_the_openai_types_and_base64_is_little_endian_float32():
    from openai.types import CreateEmbeddingResponse

    vectors = np.array([[0.5, -1.25, 3.0], [1e-3, 2.0, -0.0]], dtype=np.float32)
    parsed = CreateEmbeddingResponse.model_validate(embeddings_response(vectors, "m", 7, "float"))
    assert parsed.usage.prompt_tokens == 7 and [d.index for d in parsed.data] == [0, 1]
    assert np.array_equal(np.array([d.embedding for d in parsed.data], dtype=np.float32), vectors)
    as_base64 = embeddings_response(vectors, "m", 7, "base64")
    assert {k: v for k, v in as_base64.items() if k != "data"} == {k: v for k, v in parsed.model_dump().items()
                                                                   if k != "data"}
    assert base64.b64decode(as_base64["data"][1]["embedding"]) == vectors[1].astype("<f4").tobytes()


@pytest.mark.parametrize("raw,param,code", [
    (b'{"input": ', None, "invalid_json"),
    (b'["a"]', None, "invalid_json"),
    (b'{"model": "m"}', "input", "missing_parameter"),
    (b'{"input": 5}', "input", "invalid_type"),
    (b'{"input": []}', "input", "empty_input"),
    (b'{"input": ["a", [1, 2]]}', "input[1]", "invalid_type"),
    (b'{"input": "a", "dimensions": "8"}', "dimensions", "invalid_value"),
    (b'{"input": "a", "dimensions": 0}', "dimensions", "invalid_value"),
    (b'{"input": "a", "encoding_format": "int8"}', "encoding_format", "invalid_value"),
    (b'{"input": "a", "inputs": "b"}', "inputs", "unknown_parameter"),
])
def test_malformed_embedding_requests_name_the_field(raw, param, code):
    with pytest.raises(APIError) as err:
        parse_embeddings_request(raw)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)


def test_tei_request_parsing():
    req = parse_embed_request(b'{"inputs": "hi", "normalize": false, "prompt_name": "query"}')
    assert req.inputs.texts == ["hi"] and req.inputs.param(0) == "inputs" and req.normalize is False
    with pytest.raises(APIError) as err:
        parse_embed_request(b'{"inputs": ["a", null]}')
    assert err.value.param == "inputs[1]"
