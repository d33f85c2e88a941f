"""``babelforge submit`` against a real Ray cluster started with ``ray start --head`` on 127.0.0.1.

The cluster gets free ports for every service (other Ray clusters may run on this machine) and
its own temp dir; it is stopped by killing its own process group, never with ``ray stop``, which
would stop every Ray cluster on the machine. Fast unit tests of the submit helpers come first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from babelforge.cli import main as babelforge_main
from babelforge.cluster.submit import (DEFAULT_EXCLUDES, JobOutcome, JobRunner, JobSubmitError, build_runtime_env,
                                       is_local_address, stage_entrypoint, summarize_failure)
from babelforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RAY_PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                  "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port",
                  "--node-manager-port", "--object-manager-port")
FAILED_MESSAGE = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
                  "2026-01-01 INFO starting\n"
                  "babelforge ingest: error: /tmp/x.yaml: invalid configuration\n"
                  "  - min_chars: Input should be a valid integer (got 'oops')\n")


# ------------------------------------------------------------------------------------------ unit tests
def test_runtime_env_uploads_the_repository_without_local_state_and_ships_the_package():
    env = build_runtime_env(REPO, local=True, pip=["httpx>=0.27"], env_vars={"AWS_REGION": "eu-west-1"},
                            base={"excludes": ["big/"], "env_vars": {"AWS_REGION": "us-east-1"}})
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "platform" / "babelforge")]
    assert env["pip"] == ["httpx>=0.27"]
    assert env["env_vars"] == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AWS_REGION": "us-east-1"}  # JSON wins
    assert set(DEFAULT_EXCLUDES) | {"big/"} == set(env["excludes"])
    assert {".venv", "runs/", "outputs/"} <= set(env["excludes"])


def test_remote_clusters_get_no_loopback_switch_and_can_use_the_installed_package():
    env = build_runtime_env(REPO, local=False, ship_package=False)
    assert "env_vars" not in env and "py_modules" not in env


def test_a_requirements_file_is_passed_as_a_path(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("httpx\n")
    assert build_runtime_env(REPO, local=False, pip=[str(requirements)])["pip"] == str(requirements)
    with pytest.raises(ConfigError, match="does not exist"):
        build_runtime_env(REPO, local=False, pip=[str(tmp_path / "missing.txt")])


def test_stage_shorthand_maps_to_the_job_entry_point_and_its_default_config():
    assert stage_entrypoint("ingest", overrides=["output_dir=s3://b/run/ingest"], working_dir=REPO) == [
        "python", "jobs/ingest.py", "--config", "jobs/configs/ingest.yaml", "--set", "output_dir=s3://b/run/ingest"]
    assert stage_entrypoint("eval", working_dir=REPO)[:2] == ["python", "jobs/evaluate.py"]
    assert stage_entrypoint("run", working_dir=REPO)[1:] == ["jobs/pipeline.py", "--config",
                                                             "jobs/configs/pipeline.yaml"]
    with pytest.raises(ConfigError, match=r"no entry point jobs/nosuchstage\.py .*jobs: .*ingest"):
        stage_entrypoint("nosuchstage", working_dir=REPO)
    with pytest.raises(ConfigError, match="--config jobs/configs/missing.yaml: no such file"):
        stage_entrypoint("ingest", config="jobs/configs/missing.yaml", working_dir=REPO)


@pytest.mark.parametrize("address, local", [(None, True), ("auto", True), ("http://127.0.0.1:8265", True),
                                            ("http://localhost:8265", True), ("127.0.0.1:6379", True),
                                            ("http://10.0.3.7:8265", False), ("https://ray.example.com", False)])
def test_local_addresses(address, local):
    assert is_local_address(address) is local


def test_a_failed_job_is_summarised_by_its_error_line_with_the_detail_lines():
    outcome = JobOutcome("raysubmit_1", "FAILED", FAILED_MESSAGE, 2)
    assert outcome.error == ("babelforge ingest: error: /tmp/x.yaml: invalid configuration\n"
                             "  - min_chars: Input should be a valid integer (got 'oops')")
    assert outcome.describe().startswith("job raysubmit_1 FAILED (exit code 2): babelforge ingest: error:")
    assert summarize_failure("Traceback (most recent call last):\n  File \"x\"\nValueError: bad shard\n") == \
        "ValueError: bad shard"
    assert JobOutcome("raysubmit_2", "SUCCEEDED", "done", 0).error is None


def test_cli_rejects_ambiguous_or_unknown_requests_before_connecting(capsys):
    unreachable = ["submit", "--address", "http://127.0.0.1:9"]
    assert babelforge_main([*unreachable, "--stage", "ingest", "--status", "raysubmit_1"]) == 2
    assert "act on existing jobs" in capsys.readouterr().err
    assert babelforge_main([*unreachable, "--stage", "nosuchstage"]) == 2
    assert "no entry point jobs/nosuchstage.py" in capsys.readouterr().err
    assert babelforge_main([*unreachable, "--set", "a=b", "--", "python", "jobs/ingest.py"]) == 2
    assert "--config and --set go with --stage" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real local cluster
def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting to be reaped do not count)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the cluster's processes (one group: the `ray start` session), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


def _wait_until_accepting_jobs(runner: JobRunner, timeout_s: float = 120.0) -> None:
    """The job server answers before the head's job agent registers; submit a no-op until one runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job_id = runner.submit("true", runtime_env={})
            outcome = runner.wait(job_id, timeout_s=max(1.0, deadline - time.monotonic()))
            if outcome.succeeded:
                return
            raise JobSubmitError(outcome.describe())
        except JobSubmitError as err:
            if time.monotonic() > deadline or "No available agent" not in str(err):
                pytest.skip(f"the local cluster does not run jobs: {err}")
            time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    """A head node with a dashboard (the Jobs API) on free loopback ports, stopped at the end."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="bf-ray-", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    ports = dict(zip(RAY_PORT_FLAGS, _free_ports(len(RAY_PORT_FLAGS))))
    command = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *[f"{flag}={port}" for flag, port in ports.items()]]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(variable, None)
    start = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = start.communicate(timeout=180)
        if start.returncode != 0:
            pytest.skip(f"`ray start --head` failed:\n{output[-3000:]}")
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        runner = JobRunner(address)
        _wait_until_accepting_jobs(runner)
        yield SimpleNamespace(address=address, runner=runner, temp_dir=temp_dir, ports=ports)
    finally:
        _stop_process_group(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ingest_config(tmp_path: Path) -> Path:
    """Eight texts in two languages; one too short and one exact duplicate go to the quarantine."""
    texts = [("en", "The river carries sediment from the mountains down to the sea."),
             ("en", "Farmers settled on the fertile plains around the delta long ago."),
             ("en", "Engineers build levees that hold the floods back every spring."),
             ("de", "Der Fluss trägt Sedimente von den Bergen bis hinunter ins Meer."),
             ("de", "Die Bauern siedelten schon vor langer Zeit auf den fruchtbaren Ebenen."),
             ("de", "Ingenieure bauen Deiche, die jedes Frühjahr das Hochwasser zurückhalten."),
             ("en", "Hi"),                                                              # too_short
             ("en", "The river carries sediment from the mountains down to the sea.")]  # exact duplicate
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"doc_id": f"d{i}", "text": text, "lang": lang}, ensure_ascii=False) + "\n"
                              for i, (lang, text) in enumerate(texts)), encoding="utf-8")
    config = tmp_path / "ingest.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"),
                                  "sources": [{"path": str(source), "lang_field": "lang"}],
                                  "min_chars": 10, "dedup": {"near": False}, "langid": {"enabled": False}}))
    return config


@pytest.mark.slow
def test_an_ingest_job_runs_to_success_with_its_logs_followed_and_its_outputs_on_disk(ray_head, tmp_path, capsys):
    assert ray_head.runner.local                                          # every node is on 127.0.0.1
    config = _ingest_config(tmp_path)
    code = babelforge_main(["submit", "--address", ray_head.address, "--working-dir", str(REPO), "--",
                            "python", "jobs/ingest.py", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ingest] shards=1 rows in=8 kept=6 quarantined=2" in out      # the job's own report, followed live
    assert out.rstrip().splitlines()[-1].endswith("SUCCEEDED")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["kept"], manifest["quarantined"]) == (6, {"too_short": 1, "exact_duplicate": 1})
    kept = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    assert sorted(kept["lang"].to_pylist()) == ["de"] * 3 + ["en"] * 3


@pytest.mark.slow
def test_a_job_with_a_bad_config_fails_and_reports_its_error(ray_head, tmp_path, capsys):
    config = _ingest_config(tmp_path)
    code = babelforge_main(["submit", "--address", ray_head.address, "--working-dir", str(REPO), "--no-follow",
                            "--stage", "ingest", "--config", str(config), "--set", "min_chars=oops"])
    err = capsys.readouterr().err
    assert code == 2                                                      # the job's own exit code
    assert "FAILED (exit code 2): babelforge ingest: error:" in err
    assert "min_chars: Input should be a valid integer" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_detached_job_can_be_inspected_and_stopped(ray_head, capsys):
    code = babelforge_main(["submit", "--address", ray_head.address, "--working-dir", str(REPO), "--no-package",
                            "--no-wait", "--", "python", "-c", "import time; print('working', flush=True); "
                            "time.sleep(300)"])
    job_id = capsys.readouterr().out.strip()
    assert code == 0 and job_id.startswith("raysubmit_")
    assert ray_head.runner.status(job_id).status in ("PENDING", "RUNNING")
    assert babelforge_main(["submit", "--address", ray_head.address, "--stop", job_id]) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert babelforge_main(["submit", "--address", ray_head.address, "--status", job_id]) == 1
    assert babelforge_main(["submit", "--address", ray_head.address, "--list"]) == 0
    assert job_id in capsys.readouterr().out


@pytest.mark.slow
def test_prometheus_service_discovery_file_lists_the_metrics_endpoint(ray_head):
    """dashboards/prometheus.yml reads <temp dir>/prom_metrics_service_discovery.json on the head."""
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    configured = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert configured["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    path = Path(ray_head.temp_dir) / PROMETHEUS_SERVICE_DISCOVERY_FILE    # /tmp/ray is Ray's default temp dir
    target = f"127.0.0.1:{ray_head.ports['--metrics-export-port']}"
    deadline = time.monotonic() + 60
    while not (path.is_file() and target in path.read_text()) and time.monotonic() < deadline:
        time.sleep(1)
    assert any(target in group["targets"] for group in json.loads(path.read_text()))
