"""Eval configs: the shipped default is valid and broad; bad specs name the key; the CLI and the
Ray job script run end to end on the tiny model."""

from __future__ import annotations

import subprocess
import sys
import json
from pathlib import Path

import pytest
import yaml

from babelforge.cli import main as babelforge_main
from babelforge.config import load_config, load_config_dict
from babelforge.errors import ConfigError
from babelforge.eval.config import EvalJobConfig, build_tasks
from babelforge.eval.report import load_report
from babelforge.resources import SCRIPTS

REPO = Path(__file__).resolve().parents[1]


def test_default_config_covers_settings_languages_and_scripts():
    cfg = load_config(REPO / "jobs/configs/eval.yaml", EvalJobConfig)
    tasks, _ = build_tasks(cfg.eval)
    by_setting = {s: [t for t in tasks if t.setting == s] for s in ("monolingual", "cross-lingual", "multilingual")}
    ntrex_pairs = [t for t in by_setting["cross-lingual"] if t.name.startswith("ntrex/")]
    assert len(ntrex_pairs) >= 6 and len(by_setting["monolingual"]) >= 6 and len(by_setting["multilingual"]) == 1
    languages = {lang for t in tasks for lang in (*t.query_languages, *t.corpus_langs)}
    assert {"en", "de", "ru", "zh", "ar", "hi", "sw", "th"} <= languages
    assert len({SCRIPTS[lang] for lang in languages}) >= 5
    assert len({t.name for t in tasks}) == len(tasks)


def _spec(**task):
    return {"eval": {"tasks": [task]}}


@pytest.mark.parametrize("task, message", [
    ({"type": "ntrex", "setting": "cross-lingual", "pairs": ["xx-en"]}, "eval.tasks[0].ntrex.pairs"),
    ({"type": "ntrex", "setting": "cross-lingual", "pairs": ["en-en"]}, "two different codes"),
    ({"type": "ntrex", "setting": "cross-lingual", "langs": ["en"]}, "take `pairs`"),
    ({"type": "ntrex", "setting": "multilingual", "langs": ["en"]}, "at least two `langs`"),
    ({"type": "ntrex", "setting": "monolingual", "langs": ["de"], "lines": "ten"}, "START:STOP"),
    ({"type": "tatoeba", "langs": ["en"]}, "Tatoeba has no language"),
    ({"type": "beir", "path": "x", "spilt": "dev"}, "eval.tasks[0].beir.spilt: unknown key"),
    ({"type": "msmarco"}, "eval.tasks[0]"),
])
def test_invalid_task_specs_name_the_key(task, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config_dict(_spec(**task), EvalJobConfig, source="eval.yaml")


def test_metrics_must_include_ndcg_at_10():
    with pytest.raises(ConfigError, match="eval.metrics"):
        load_config_dict({"eval": {"tasks": [{"type": "tatoeba", "langs": ["de"]}], "metrics": ["recall@10"]}},
                         EvalJobConfig)


@pytest.fixture
def small_config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"eval": {"use_ray": True, "dims": [32, 16], "tasks": [
        {"type": "ntrex", "setting": "cross-lingual", "pairs": ["de-en", "en-th"], "lines": "0:40"},
        {"type": "ntrex", "setting": "multilingual", "langs": ["en", "de"], "lines": "0:20"},
        {"type": "tatoeba", "langs": ["sw"], "max_queries": 20}]}}))
    return path


def test_cli_writes_reports_and_compares_to_a_baseline(small_config, tiny_encoder_dir, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["eval", "--config", str(small_config), "--model", str(tiny_encoder_dir), "--set", "eval.use_ray=false"]
    assert babelforge_main([*args, "--output-dir", str(first)]) == 0
    out = capsys.readouterr().out
    assert "# Retrieval evaluation of" in out and "tatoeba/sw-en" in out
    report = load_report(first)
    assert [t.name for t in report.tasks] == ["ntrex/de-en", "ntrex/en-th", "ntrex/pool-en-de", "tatoeba/sw-en"]
    assert report.dims == [32, 16] and (first / "report.md").is_file() and (first / "config.yaml").is_file()
    assert babelforge_main([*args, "--output-dir", str(second), "--baseline", str(first / "report.json")]) == 0
    comparison = (second / "compare.md").read_text()
    assert "| ntrex/de-en |" in comparison and "+0.00" in comparison


def test_cli_reports_a_missing_model_directory(small_config, tmp_path, capsys):
    assert babelforge_main(["eval", "--config", str(small_config), "--model", str(tmp_path / "nope")]) == 2
    assert "model directory" in capsys.readouterr().err


def test_job_script_runs_the_library(small_config, tiny_encoder_dir, tmp_path):
    out = tmp_path / "job"
    done = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--config", str(small_config),
                           "--model", str(tiny_encoder_dir), "--output-dir", str(out),
                           "--set", "eval.use_ray=false", "--set", "eval.dims=[8]"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_report(out).dims == [8]


def test_build_tasks_applies_prompts_caps_and_loads_beir(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    for name, kind in (("corpus", "doc"), ("queries", "query")):
        records = [json.dumps({"_id": f"{kind[0]}{i}", "text": f"{kind} {i}"}) for i in range(5)]
        (beir / f"{name}.jsonl").write_text("\n".join(records) + "\n")
    rows = "".join(f"q{i}\td{i}\t1\n" for i in range(5))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    cfg = load_config_dict({"eval": {"max_queries": 3, "tasks": [
        {"type": "beir", "path": str(beir), "name": "mini"},
        {"type": "ntrex", "setting": "cross-lingual", "pairs": ["en-de"], "lines": "0:10",
         "prompts": {"query": None, "corpus": None}, "max_queries": 4}]}}, EvalJobConfig)
    (mini, pair), (beir_report,) = build_tasks(cfg.eval)
    assert mini.name == "mini" and len(mini.queries) == 3 and len(mini.corpus) == 5 and beir_report.queries == 5
    assert (mini.query_prompt, mini.corpus_prompt) == ("query", "passage")
    assert len(pair.queries) == 4 and (pair.query_prompt, pair.corpus_prompt) == (None, None)
