"""The main job's wiring: config validation, stage chaining, the summary it writes, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from babelforge.cli import main as cli_main
from babelforge.config import load_config, load_config_dict
from babelforge.errors import ConfigError
from babelforge.pipeline import PipelineConfig, run_pipeline

SMALL_EVAL = {"use_ray": True, "batch_size": 16, "dims": [32, 16],
              "tasks": [{"type": "ntrex", "setting": "cross-lingual", "pairs": ["de-en"], "lines": "0:40"},
                        {"type": "ntrex", "setting": "multilingual", "langs": ["en", "de", "fr"], "lines": "0:20"}]}


def test_stage_sections_get_run_dir_paths_and_shared_ray_options(tmp_path):
    cfg = load_config_dict({"run_dir": str(tmp_path), "ray": {"num_cpus": 2},
                            "stages": ["base_model", "ingest"],
                            "ingest": {"sources": [{"bundled": "ntrex", "languages": ["de"]}]}}, PipelineConfig)
    assert cfg.ingest.output_dir == f"{tmp_path}/ingest"
    assert cfg.ingest.ray.num_cpus == 2


def test_config_errors_name_the_key_and_the_stage_problems(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.sources\[0\]\.bundled"):
        load_config_dict({"stages": ["ingest"], "ingest": {"sources": [{"bundled": "wiki"}]}}, PipelineConfig)
    with pytest.raises(ConfigError, match=r"stages \['ingest'\] are listed in `stages` but have no config section"):
        load_config_dict({"stages": ["ingest"]}, PipelineConfig)
    with pytest.raises(ConfigError, match="must follow the pipeline order"):
        load_config_dict({"stages": ["eval_base", "base_model"], "eval": SMALL_EVAL}, PipelineConfig)
    with pytest.raises(ConfigError, match="stages\\[0\\]"):
        load_config_dict({"stages": ["train_everything"]}, PipelineConfig)


def test_shipped_pipeline_config_is_valid():
    cfg = load_config("jobs/configs/pipeline.yaml", PipelineConfig)
    assert cfg.stages[0] == "base_model" and "eval_base" in cfg.stages


def test_pipeline_runs_base_model_and_eval_on_a_tiny_model(tmp_path, ray_local, tiny_encoder_dir):
    cfg = load_config_dict({"run_dir": str(tmp_path / "run"), "base_model": str(tiny_encoder_dir),
                            "stages": ["base_model", "eval_base"], "eval": SMALL_EVAL}, PipelineConfig)
    outcomes = run_pipeline(cfg)
    assert [o.name for o in outcomes] == ["base_model", "eval_base"]
    report = json.loads((tmp_path / "run" / "eval_base" / "report.json").read_text())
    assert {t["name"] for t in report["tasks"]} == {"ntrex/de-en", "ntrex/pool-en-de-fr"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["artifacts"]["base_model_dir"] == str(tiny_encoder_dir)
    assert [s["name"] for s in summary["stages"]] == ["base_model", "eval_base"]


def test_cli_lists_every_stage_and_reports_errors_with_exit_code_2(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "babelforge.cli", "--help"], capture_output=True, text=True, check=True)
    for stage in ("run", "models", "eval", "ingest", "synth", "filter", "mine", "train", "serve", "submit"):
        assert stage in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nstagez: []\n")
    assert cli_main(["run", "--config", str(bad)]) == 2
    assert "stagez: unknown key" in capsys.readouterr().err


def test_ingest_keeps_every_evaluation_text_out_of_the_corpus(tmp_path, ray_local):
    """Eval texts exported by the pipeline are quarantined as eval_contamination, none are kept."""
    import pyarrow.parquet as pq

    cfg = load_config_dict({
        "run_dir": str(tmp_path / "run"), "stages": ["ingest"],
        "eval": {"tasks": [{"type": "tatoeba", "langs": ["sw"], "max_queries": 20}]},
        "ingest": {"sources": [{"bundled": "tatoeba", "languages": ["sw"]}], "dedup": {"near": False}},
    }, PipelineConfig)
    run_pipeline(cfg)
    eval_texts = set((tmp_path / "run" / "eval_texts.txt").read_text(encoding="utf-8").splitlines())
    manifest = json.loads((tmp_path / "run" / "ingest" / "manifest.json").read_text())
    assert manifest["quarantined"]["eval_contamination"] >= 20 + 300   # 20 sw queries + the English corpus
    kept = pq.read_table(tmp_path / "run" / "ingest" / "data").column("text").to_pylist()
    assert not {" ".join(t.split()) for t in kept} & eval_texts
    assert len(kept) > 0   # the sw sentences that are not eval queries stay


def test_serve_stage_answers_over_http_with_the_in_process_embeddings(tmp_path, ray_local, tiny_encoder_dir, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config_dict({"run_dir": str(tmp_path / "run"), "base_model": str(tiny_encoder_dir),
                            "stages": ["base_model", "serve"],
                            "serve": {"port": port, "num_cpus": 0.5, "dimensions": 16,
                                      "queries": ["Hallo Welt", "你好"], "passages": ["hello world", "bonjour"]}},
                           PipelineConfig)
    outcomes = run_pipeline(cfg)
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/v1" in out and "'Hallo Welt'\n    -> " in out
    deviation = float(out.split("max |served - in-process| = ")[1].split()[0])
    assert deviation < 1e-4
    assert outcomes[-1].artifacts["served_model_dir"] == str(tiny_encoder_dir)
    import httpx

    with pytest.raises(httpx.HTTPError):   # the stage stopped the server
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
