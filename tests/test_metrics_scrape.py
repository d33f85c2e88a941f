"""The data-pipeline and serving dashboards find every metric they query on a real Ray cluster.

The slow test runs, on the session cluster (127.0.0.1), an ingest job and a synth job in process
(the synth backend is a local fake OpenAI-compatible server, so generation is instant), deploys
the Serve embedder and sends it a good and a bad request, then scrapes the node's Prometheus
endpoint (its metrics export port) until every name the two dashboards query is there, and
checks exact counts for a shard of known content. GPU node metrics (``ray_node_gpus_*``,
``ray_node_gram_*``) exist only on GPU nodes; they and the training dashboard's metrics are
checked by name in tests/test_cluster_manifests.py (Ray's source, ``babelforge.train.metrics``).
Fast tests cover the recorder's guards (no Ray, a failing metrics backend) and its stage tags.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
import ray

from babelforge import observability
from babelforge.config import load_config_dict
from babelforge.data.config import IngestConfig
from babelforge.data.ingest import run_ingest
from babelforge.data.shards import REJECT_REASON, ShardWriter
from babelforge.serve import ServeConfig, start_server
from babelforge.synth.config import SynthJobConfig
from babelforge.synth.stage import run_synth
from test_cluster_manifests import DASHBOARDS, dashboard_metric_names

SCRAPED_DASHBOARDS = ("data_pipeline.json", "serving.json")
GPU_NODE_METRIC = re.compile(r"^ray_node_(gpus|gpu|gram)_")
FLUSH_TIMEOUT_S = 90           # Ray's metrics agents export every ~10 s; the machine may be busy
ENGLISH = ["The river carries fine sediment from the mountains all the way down to the sea.",
           "Farmers settled on the fertile plains around the delta many centuries ago.",
           "Engineers build levees and dams that hold the spring floods back from the towns.",
           "The city council voted to pay for the new buses with a small local tax.",
           "Most visitors reach the old harbour by ferry in the early morning hours.",
           "The museum keeps its oldest maps in a dark room at a constant temperature."]


class FakeChatCompletions:
    """An OpenAI-compatible chat server on 127.0.0.1 that always answers one valid example."""

    ANSWER = json.dumps({"query": "How do towns pay for their buses?",
                         "positive": "The city council pays for the new buses with a small local tax on shops.",
                         "hard_negative": "Trains in the capital are often late during the winter months."})

    def __init__(self) -> None:
        answer = self.ANSWER

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                                   "usage": {"prompt_tokens": len(payload["messages"][-1]["content"].split()),
                                             "completion_tokens": len(answer.split())}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ingest(root: Path) -> str:
    source = root / "docs.jsonl"
    rows = [{"doc_id": f"e{i}", "text": text} for i, text in enumerate(ENGLISH)] + [{"doc_id": "short", "text": "Hi"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = IngestConfig.model_validate({"output_dir": str(root / "ingest"), "min_chars": 10,
                                       "sources": [{"path": str(source), "lang": "en"}],
                                       "dedup": {"near": False}, "langid": {"enabled": False}})
    summary = run_ingest(cfg)
    assert (summary.kept, summary.quarantined) == (len(ENGLISH), {"too_short": 1})
    return cfg.output_dir


def _run_synth(corpus: str, root: Path, url: str) -> None:
    settings = {"languages": ["en"], "quota_per_language": 4, "tasks": ["short_long"], "rows_per_shard": 4,
                "max_attempts": 1, "seeds": {"min_chars": 20, "max_chars": 200},
                "backend": {"kind": "openai", "base_url": url, "model": "fake-model", "api_key_env": None,
                            "max_retries": 0, "batch_size": 4}}
    config = load_config_dict({"input": corpus, "output_dir": str(root / "synth"), "synth": settings}, SynthJobConfig)
    summary = run_synth(config)
    assert summary.extra["generated_tokens"] > 0 and summary.kept > 0


def _commit_reference_shard(output_dir: Path, stage: str = "scrape-reference") -> None:
    """A shard with known counts (5 in, 3 kept, 2 quarantined) under a stage name no other test uses."""
    writer = ShardWriter(str(output_dir), stage=stage, schema=pa.schema([("text", pa.string())]))
    with writer.open("part-00000", rows_in=5) as sink:
        sink.write(pa.table({"text": ["a", "b", "c", "d", "e"], REJECT_REASON: [None, None, None, "too_short", "bad"]}))


def _serve_two_requests(model_dir: Path):
    cfg = ServeConfig(model_path=str(model_dir), model_name="scrape-tiny", app_name="bf-scrape", num_cpus=0.5,
                      http={"port": _free_port()}, auth={"api_keys_env": None})
    server = start_server(cfg)
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["hello world"]}, timeout=60)
    bad = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["hello"], "dimensions": 3}, timeout=60)
    assert (ok.status_code, bad.status_code) == (200, 400)
    return server


def _samples(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("output_dir, label", [
    ("runs/x/ingest", "ingest"), ("s3://bucket/run1/ingest", "ingest"),
    ("/data/run1/ingest/_ingest/staging", "ingest.staging"),
    ("gs://bucket/run1/ingest/_ingest/staging", "ingest.staging"),
])
def test_internal_outputs_get_their_own_stage_tag(output_dir, label):
    assert observability.stage_label("ingest", output_dir) == label


def test_commits_record_nothing_without_ray(monkeypatch, tmp_path):
    monkeypatch.setattr(observability, "_data_metrics", _must_not_be_called)
    monkeypatch.setitem(sys.modules, "ray", None)          # a process that never imported Ray
    _commit_reference_shard(tmp_path / "no-ray")
    assert json.loads((tmp_path / "no-ray" / "manifest.json").read_text())["kept"] == 3


def test_a_failing_metrics_backend_never_fails_a_commit(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(observability, "_data_metrics", _must_not_be_called)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    _commit_reference_shard(tmp_path / "broken-metrics")
    assert (tmp_path / "broken-metrics" / "_done" / "part-00000.json").is_file()
    assert "could not record metrics of shard part-00000" in caplog.text


def _must_not_be_called():
    raise AssertionError("the metrics backend was used")


@pytest.mark.slow
def test_every_metric_the_data_and_serving_dashboards_query_is_scraped(ray_local, tiny_encoder_dir, tmp_path):
    node = next(n for n in ray_local.nodes() if n["Alive"])
    endpoint = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    fake = FakeChatCompletions()
    server = None
    try:
        _run_synth(_run_ingest(tmp_path), tmp_path, fake.url)
        _commit_reference_shard(tmp_path / "reference")
        server = _serve_two_requests(tiny_encoder_dir)
        wanted = {name for dashboard in SCRAPED_DASHBOARDS for name in dashboard_metric_names(DASHBOARDS / dashboard)
                  if not GPU_NODE_METRIC.match(name)}
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            text = httpx.get(endpoint, timeout=10).text
            exported = set(re.findall(r"^(ray_[a-zA-Z0-9_]+)", text, re.M))
            missing = wanted - exported
            reference_done = _samples(text, "ray_babelforge_data_shards_committed_total", stage="scrape-reference") >= 1
            if (not missing and reference_done) or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        fake.server.shutdown()
        if server is not None:
            server.stop()
    assert not missing, f"dashboards query metrics nobody exported: {sorted(missing)}"
    ref = {"stage": "scrape-reference"}
    assert _samples(text, "ray_babelforge_data_rows_in_total", **ref) == 5
    assert _samples(text, "ray_babelforge_data_rows_total", outcome="kept", **ref) == 3
    assert _samples(text, "ray_babelforge_data_rows_total", outcome="quarantined", **ref) == 2
    assert _samples(text, "ray_babelforge_data_quarantined_total", reason="too_short", **ref) == 1
    assert _samples(text, "ray_babelforge_synth_generated_tokens_total", stage="synth") > 0

