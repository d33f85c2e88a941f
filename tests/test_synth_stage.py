"""The synth stage end to end through Ray, against a local fake OpenAI-compatible server.

The fake server answers according to a marker in each seed passage (valid, fenced, flaky on the
first attempt, always in the wrong language, ...), so kept / quarantined counts, retries and
request counts are exact.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.cli import main as babelforge_main
from babelforge.config import load_config_dict
from babelforge.data.shards import ShardSink, ShardWriter
from babelforge.errors import ConfigError
from babelforge.schema import CORPUS_SCHEMA, SYNTHETIC_SCHEMA
from babelforge.synth.config import SynthJobConfig
from babelforge.synth.personas import load_personas
from babelforge.synth.plan import build_plan, sample_seed_passages, shard_plan
from babelforge.synth.stage import format_summary, run_synth
from babelforge.synth.tasks import TASKS

# marker -> (attempts it takes, outcome)
BEHAVIOUR = {"valid": (1, "kept"), "fenced": (1, "kept"), "flaky": (2, "kept"), "german": (2, "wrong_language"),
             "same": (2, "query_equals_positive"), "broken": (2, "invalid_json"), "error": (2, "backend_error")}
MARKERS = ["valid"] * 4 + ["fenced"] * 2 + ["flaky"] * 2 + ["german", "same", "broken", "error"]
SEED_PATTERN = re.compile(r"Seed text \(.*?\): Passage (\d+) \[(\w+)\]")


def _example(number: int) -> dict[str, str]:
    return {"query": f"What does passage {number} say about buses?",
            "positive": f"Passage {number} explains that the town pays for its buses with taxes and ticket sales.",
            "hard_negative": f"Passage {number} also mentions that trains in the capital are often late in winter."}


def _answer(payload: dict) -> tuple[int, str]:
    number, marker = SEED_PATTERN.search(payload["messages"][-1]["content"]).groups()
    example = _example(int(number))
    if marker == "error":
        return 500, "internal error"
    if marker == "fenced":
        return 200, f"Here is the example:\n```json\n{json.dumps(example)}\n```\nAnything else?"
    if marker == "flaky" and payload["temperature"] <= 0.5:  # first attempt
        return 200, json.dumps(example)[:50]
    if marker == "german":
        example = {"query": f"Was steht in Abschnitt {number} über Busse?",
                   "positive": f"Abschnitt {number} erklärt, dass die Stadt ihre Busse mit Steuern bezahlt.",
                   "hard_negative": "Züge in der Hauptstadt sind im Winter oft verspätet."}
    if marker == "same":
        example["query"] = example["positive"]
    if marker == "broken":
        return 200, "I am sorry, I cannot write that."
    return 200, json.dumps(example)


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 that records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.requests.append(payload)
                status, content = _answer(payload) if self.path == "/v1/chat/completions" else (404, "no route")
                body = content if status != 200 else json.dumps({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(payload["messages"][-1]["content"].split()),
                              "completion_tokens": len(content.split())}})
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def seeds_requested(self) -> Counter:
        return Counter(int(SEED_PATTERN.search(r["messages"][-1]["content"]).group(1)) for r in self.requests)


@pytest.fixture(scope="module")
def fake_server():
    server = FakeOpenAI()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "data" / "part-00000.parquet"
    path.parent.mkdir(parents=True)
    texts = [f"Passage {i} [{marker}] The town council discussed how to pay for its buses."
             for i, marker in enumerate(MARKERS)]
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts,
                             "lang": ["en"] * len(texts), "source": ["test"] * len(texts),
                             "meta": ["{}"] * len(texts)}, schema=CORPUS_SCHEMA), path)
    return str(path.parent.parent)


def _config(corpus, output_dir, url, **synth) -> SynthJobConfig:
    settings = {"languages": ["en"], "quota_per_language": len(MARKERS),
                "tasks": ["short_long", "long_long", "short_short", "qa"], "rows_per_shard": 4, "max_attempts": 2,
                "seeds": {"min_chars": 20, "max_chars": 200},
                "sampling": {"temperature": 0.5, "retry_temperature_step": 0.3, "max_new_tokens": 64},
                "backend": {"kind": "openai", "base_url": url, "model": "fake-model", "api_key_env": None,
                            "max_retries": 0, "max_concurrent_requests": 4, "batch_size": 4}, **synth}
    return load_config_dict({"input": corpus, "output_dir": str(output_dir), "synth": settings}, SynthJobConfig)


def _expected_requests(seeds) -> int:
    return sum(BEHAVIOUR[MARKERS[seed]][0] for seed in seeds)


def test_every_planned_generation_is_kept_or_quarantined(corpus, fake_server, tmp_path, ray_local):
    fake_server.requests.clear()
    summary = run_synth(_config(corpus, tmp_path / "synth", fake_server.url))

    outcomes = Counter(BEHAVIOUR[m][1] for m in MARKERS)
    assert summary.rows_in == len(MARKERS) == summary.kept + sum(summary.quarantined.values())
    assert summary.kept == outcomes.pop("kept") and summary.quarantined == dict(outcomes)
    assert summary.shards == 3 and summary.resumed_shards == 0
    assert len(fake_server.requests) == summary.extra["generations"] == _expected_requests(range(len(MARKERS)))
    assert fake_server.seeds_requested() == {i: BEHAVIOUR[m][0] for i, m in enumerate(MARKERS)}
    assert summary.extra["generated_tokens"] > 0 and summary.extra["generated_tokens_per_s"] > 0
    assert summary.extra["accepted_per_s"] > 0

    kept = pq.read_table(tmp_path / "synth" / "data").to_pylist()
    assert pq.read_schema(tmp_path / "synth" / "data" / "part-00000.parquet") == SYNTHETIC_SCHEMA
    personas = {p.persona for p in load_personas()}
    for row in kept:
        number = int(row["seed_id"].split("-")[1])
        assert MARKERS[number] in ("valid", "fenced", "flaky") and row["query"] == _example(number)["query"]
        assert row["lang"] == "en" and row["instruction"] in TASKS[row["task"]].instructions
        assert row["persona"] in personas and (row["backend"], row["model"]) == ("openai", "fake-model")
    writer = ShardWriter(str(tmp_path / "synth"), stage="synth", schema=SYNTHETIC_SCHEMA)
    quarantined = {q["reason"]: q for q in writer.iter_quarantine()}
    assert quarantined["invalid_json"]["record"] == "I am sorry, I cannot write that."
    assert "Abschnitt" in quarantined["wrong_language"]["record"]
    assert quarantined["backend_error"]["detail"].startswith("attempt 2/2") \
        and "HTTP 500" in quarantined["backend_error"]["detail"]
    assert all(q["stage"] == "synth" and "plan item en-" in q["source"] for q in quarantined.values())
    assert "tokens/s" in format_summary(summary) and "accepted samples/s" in format_summary(summary)


class _Interrupted(Exception):
    pass


def test_rerun_resumes_from_committed_shards(corpus, fake_server, tmp_path, ray_local, monkeypatch, capsys):
    config = _config(corpus, tmp_path / "synth", fake_server.url)
    commit = ShardSink.commit

    def commit_then_die(sink):
        commit(sink)
        raise _Interrupted(sink.shard)  # the job is killed right after its first shard commits

    monkeypatch.setattr(ShardSink, "commit", commit_then_die)
    with pytest.raises(_Interrupted):
        run_synth(config)
    monkeypatch.setattr(ShardSink, "commit", commit)
    first_shard = tmp_path / "synth" / "data" / "part-00000.parquet"
    written = first_shard.stat().st_mtime_ns
    assert sorted(p.name for p in (tmp_path / "synth" / "_done").iterdir()) == ["part-00000.json"]
    assert not list((tmp_path / "synth" / "data").glob(".*.tmp"))  # the aborted shard left nothing

    pool = sample_seed_passages(corpus, {"en": len(MARKERS)}, seed=0, min_chars=20, max_chars=200)
    plan = build_plan(pool, load_personas(), ["en"], {"en": len(MARKERS)}, config.synth.tasks, seed=0)
    remaining = {int(item.seed_id.split("-")[1]) for shard in shard_plan(plan, 4)[1:] for item in shard.items}

    fake_server.requests.clear()
    config_file = tmp_path / "synth.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
    assert babelforge_main(["synth", "--config", str(config_file)]) == 0

    assert set(fake_server.seeds_requested()) == remaining  # the committed shard was not regenerated
    assert len(fake_server.requests) == _expected_requests(remaining)
    assert first_shard.stat().st_mtime_ns == written
    printed = capsys.readouterr().out
    assert "[synth] shards=3 (1 resumed from an earlier run) rows in=12 kept=8 quarantined=4" in printed
    assert "accepted samples/s" in printed


def test_a_different_plan_does_not_resume_over_old_shards(corpus, fake_server, tmp_path, ray_local):
    run_synth(_config(corpus, tmp_path / "synth", fake_server.url, quota_per_language=4))
    with pytest.raises(ConfigError, match="different synth plan"):
        run_synth(_config(corpus, tmp_path / "synth", fake_server.url, quota_per_language=4, seed=1))
