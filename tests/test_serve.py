"""The embedding server on a real Ray Serve app (127.0.0.1), called with the official openai client
and raw HTTP: parity with in-process encoding, prompts, Matryoshka, batching, limits, auth, metrics.

Two applications share one Serve instance for the module: ``open`` (no auth, over-long inputs
rejected) and ``secure`` (API key required, over-long inputs truncated)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

from babelforge.models import Embedder
from babelforge.serve import ServeConfig, start_server

pytestmark = pytest.mark.slow

TEXTS = ["Hallo Welt", "Москва — столица России.", "東京は日本の首都です", "a short one",
         "مرحبا بالعالم"]
API_KEY = "bf-test-key-5d0c1e"
WRONG_KEY = "bf-wrong-key-77aa10"
OPEN_MAX_TOKENS = 64
SECURE_MAX_TOKENS = 12
LONG_TEXT = "many words in a long sentence " * 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def servers(ray_local, tiny_encoder_dir, tmp_path_factory):
    from ray import serve

    keys_file = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    keys_file.write_text(f"# test keys\n{API_KEY}\n")
    common = dict(model_path=str(tiny_encoder_dir), model_name="tiny", num_cpus=0.5,
                  http={"port": _free_port()}, batching={"max_batch_size": 64, "batch_wait_timeout_s": 0.05})
    open_cfg = ServeConfig(**common, app_name="bf-test-open",
                           limits={"max_inputs": 8, "max_chars": 400, "max_tokens": OPEN_MAX_TOKENS,
                                   "overflow": "reject"},
                           auth={"api_keys_env": None})
    secure_cfg = ServeConfig(**common, app_name="bf-test-secure", route_prefix="/secure",
                             limits={"max_tokens": SECURE_MAX_TOKENS, "overflow": "truncate"},
                             auth={"api_keys_env": None, "api_keys_file": str(keys_file), "required": True})
    running = []
    try:
        running.append(start_server(open_cfg))
        running.append(start_server(secure_cfg, api_key=API_KEY))
        yield SimpleNamespace(open=running[0], secure=running[1])
    finally:
        for server in running:
            server.stop()
        serve.shutdown()


@pytest.fixture(scope="module")
def local_model(tiny_encoder_dir):
    return Embedder.from_pretrained(tiny_encoder_dir)


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.open.openai_base_url, api_key="not-checked", max_retries=0)


def _post(server, path: str, body, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


# ----------------------------------------------------------------------------- parity with in-process encode
def test_openai_client_embeddings_equal_in_process_encode(client, local_model):
    response = client.embeddings.create(model="tiny", input=TEXTS, dimensions=8)
    assert response.model == "tiny" and [d.index for d in response.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(_vectors(response), local_model.encode(TEXTS, dim=8), atol=1e-5)
    assert response.usage.prompt_tokens == sum(local_model.count_tokens(TEXTS))


def test_float_and_base64_encodings_carry_the_same_vectors(servers, local_model):
    as_float = _post(servers.open, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"}).json()
    as_base64 = _post(servers.open, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}).json()
    floats = np.array([d["embedding"] for d in as_float["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_base64["data"]])
    np.testing.assert_array_equal(floats, decoded)
    assert decoded.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(decoded, local_model.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=1e-5)


def test_string_input(client, local_model):
    response = client.embeddings.create(model="tiny", input="Hallo Welt", dimensions=16)
    assert len(response.data) == 1
    np.testing.assert_allclose(_vectors(response)[0], local_model.encode("Hallo Welt", dim=16), atol=1e-5)


def test_input_type_applies_the_query_or_passage_prompt(client, local_model):
    text = ["Wie hoch ist der Eiffelturm?"]
    query = client.embeddings.create(model="tiny", input=text, extra_body={"input_type": "query"})
    passage = client.embeddings.create(model="tiny", input=text, extra_body={"input_type": "passage"})
    plain = client.embeddings.create(model="tiny", input=text)
    np.testing.assert_allclose(_vectors(query), local_model.encode(text, prompt_name="query"), atol=1e-5)
    np.testing.assert_allclose(_vectors(passage), local_model.encode(text, prompt_name="passage"), atol=1e-5)
    assert not np.allclose(_vectors(query), _vectors(passage), atol=1e-3)
    assert query.usage.prompt_tokens > plain.usage.prompt_tokens


def test_tei_embed_route(servers, local_model):
    body = {"inputs": TEXTS[:3], "prompt_name": "passage", "dimensions": 16}
    vectors = np.array(_post(servers.open, "/embed", body).json(), dtype=np.float32)
    np.testing.assert_allclose(vectors, local_model.encode(TEXTS[:3], prompt_name="passage", dim=16), atol=1e-5)
    raw = np.array(_post(servers.open, "/embed", {"inputs": "Hallo Welt", "normalize": False}).json())
    assert raw.shape == (1, 32) and abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw), local_model.encode("Hallo Welt"), atol=1e-5)


def test_models_and_health(servers, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    listed = httpx.get(f"{servers.open.url}/v1/models").json()["data"][0]
    assert listed["dimensions"] == [32, 16, 8] and listed["input_types"] == ["passage", "query"]
    assert listed["max_tokens"] == OPEN_MAX_TOKENS
    assert httpx.get(f"{servers.open.url}/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- dynamic batching
def test_concurrent_requests_are_batched_together_and_routed_back(servers, local_model):
    from ray import serve

    handle = serve.get_app_handle(servers.open.config.app_name)
    before = handle.batch_stats.remote().result()
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "trains", "rain", "tea"] * 6)]

    async def send_all():
        async with httpx.AsyncClient(base_url=servers.open.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/embeddings", json={"input": [t], "encoding_format": "float"})
                                          for t in texts))

    responses = asyncio.run(send_all())
    after = handle.batch_stats.remote().result()
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, local_model.encode(texts), atol=1e-5)
    batches = after["batches"] - before["batches"]
    assert after["inputs"] - before["inputs"] == len(texts)
    assert batches < len(texts) and after["max_requests_per_batch"] > 1, (before, after)


# ----------------------------------------------------------------------------- limits and errors
ERROR_CASES = {
    "untrained dimensions": ({"input": ["ok"], "dimensions": 12}, 400, "dimensions", "unsupported_dimensions"),
    "too many inputs": ({"input": ["x"] * 9}, 400, "input", "too_many_inputs"),
    "too many tokens": ({"input": ["ok", LONG_TEXT[:300]]}, 400, "input[1]", "input_too_long"),
    "too many chars": ({"input": "y" * 401}, 400, "input", "input_too_long"),
    "empty string": ({"input": ["ok", ""]}, 400, "input[1]", "empty_input"),
    "blank string": ({"input": "   "}, 400, "input", "empty_input"),
    "number input": ({"input": 5}, 400, "input", "invalid_type"),
    "token ids": ({"input": [1, 2]}, 400, "input[0]", "invalid_type"),
    "unknown model": ({"input": "ok", "model": "gpt-4"}, 404, "model", "model_not_found"),
    "unknown input_type": ({"input": "ok", "input_type": "sts"}, 400, "input_type", "unknown_input_type"),
    "string dimensions": ({"input": "ok", "dimensions": "8"}, 400, "dimensions", "invalid_value"),
    "unknown field": ({"input": "ok", "truncate": True}, 400, "truncate", "unknown_parameter"),
    "malformed JSON": (b'{"input": ["ok",', 400, None, "invalid_json"),
}


@pytest.mark.parametrize("body,status,param,code", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_invalid_requests_get_a_json_error_naming_the_field(servers, body, status, param, code):
    response = _post(servers.open, "/v1/embeddings", body)
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (status, param, code), error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_tei_route_errors_name_its_fields(servers):
    response = _post(servers.open, "/embed", {"inputs": ["ok", 3]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "inputs[1]"
    response = _post(servers.open, "/embed", {"inputs": ["ok", LONG_TEXT[:300]], "truncate": False})
    assert response.status_code == 400 and response.json()["error"]["param"] == "inputs[1]"
    response = _post(servers.open, "/embed", {"inputs": "ok", "prompt_name": "nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_name"


def test_unknown_routes_and_methods_answer_json(servers):
    missing = httpx.get(f"{servers.open.url}/v2/embeddings")
    wrong_method = httpx.get(f"{servers.open.url}/v1/embeddings")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "method_not_allowed")


def test_openai_client_surfaces_the_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny", input=["ok"], dimensions=12)
    assert err.value.param == "dimensions" and err.value.code == "unsupported_dimensions"


def test_replica_keeps_serving_after_errors(client, local_model):
    response = client.embeddings.create(model="tiny", input=["still alive"], dimensions=8)
    np.testing.assert_allclose(_vectors(response), local_model.encode(["still alive"], dim=8), atol=1e-5)


def test_truncate_mode_embeds_the_first_max_tokens(servers, local_model):
    response = _post(servers.secure, "/v1/embeddings", {"input": ["ok", LONG_TEXT], "encoding_format": "float"},
                     headers=servers.secure.headers())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == local_model.count_tokens(["ok"])[0] + SECURE_MAX_TOKENS
    truncated = local_model.encode([LONG_TEXT], max_length=SECURE_MAX_TOKENS)
    np.testing.assert_allclose(body["data"][1]["embedding"], truncated[0], atol=1e-5)


# ----------------------------------------------------------------------------- auth
def test_auth_rejects_missing_and_wrong_keys(servers):
    url = f"{servers.secure.url}/v1/embeddings"
    missing = httpx.post(url, json={"input": "hi"})
    wrong = httpx.post(url, json={"input": "hi"}, headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{servers.secure.url}/v1/models").status_code == 401
    assert _post(servers.secure, "/embed", {"inputs": "hi"}).status_code == 401
    assert httpx.get(f"{servers.secure.url}/health").status_code == 200  # probes need no key


def test_auth_accepts_the_right_key_with_the_openai_client(servers, local_model):
    good = openai.OpenAI(base_url=servers.secure.openai_base_url, api_key=API_KEY, max_retries=0)
    response = good.embeddings.create(model="tiny", input=["hi there"], dimensions=8)
    np.testing.assert_allclose(_vectors(response), local_model.encode(["hi there"], dim=8), atol=1e-5)
    bad = openai.OpenAI(base_url=servers.secure.openai_base_url, api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="tiny", input=["hi there"])
    np.testing.assert_allclose(servers.secure.embed(["hi there"], dimensions=8), _vectors(response), atol=1e-6)


def test_keys_never_reach_the_logs(servers, ray_local):
    logs_dir = Path(ray_local._private.worker.global_worker.node.get_logs_dir_path())
    leaked = [p for p in logs_dir.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
              and (API_KEY.encode() in p.read_bytes() or WRONG_KEY.encode() in p.read_bytes())]
    assert not leaked


# ----------------------------------------------------------------------------- metrics
def test_metrics_are_exported_through_ray(servers, ray_local):
    port = ray_local.nodes()[0]["MetricsExportPort"]
    wanted = ['ray_babelforge_serve_requests_total{', 'route="/v1/embeddings"', 'code="unsupported_dimensions"',
              "ray_babelforge_serve_request_latency_seconds_bucket", "ray_babelforge_serve_batch_size_bucket",
              "ray_babelforge_serve_batch_requests_bucket", "ray_babelforge_serve_batch_tokens_bucket",
              "ray_babelforge_serve_batch_duration_seconds_bucket",
              "ray_babelforge_serve_tokens_total", "ray_babelforge_serve_inputs_total",
              'code="invalid_api_key"']
    deadline = time.monotonic() + 40  # replicas report to Ray's metrics agent every ~10 s
    missing = wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [w for w in wanted if w not in text]
        if missing:
            time.sleep(1)
    assert not missing
