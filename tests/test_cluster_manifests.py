"""Cluster definitions and dashboards checked against the repository they deploy.

Everything is read from disk and iterated, so files added later are covered: every YAML/JSON
under cluster/ and dashboards/, every RayJob's entry point and config (validated with the job's
own config model), every train preset and synth config against the GPU groups that run them,
every image against cluster/image/Dockerfile, and every metric a dashboard queries against the
metrics the code defines (babelforge's ``EXPORTED_NAMES``, Ray's own metric names in its
installed source).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
import yaml

from babelforge.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DASHBOARDS = REPO / "dashboards"
DOCKERFILE = CLUSTER / "image" / "Dockerfile"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
CONFIG_FILES = sorted(p for p in [*CLUSTER.rglob("*"), *DASHBOARDS.rglob("*")]
                      if p.suffix in (".yaml", ".yml", ".json"))

# GPUs, GPU model (Ray's accelerator_type) and vCPUs of the instance / machine types the configs use.
MACHINES: dict[str, tuple[int, str | None, int]] = {
    "m6i.2xlarge": (0, None, 8), "m6i.8xlarge": (0, None, 32),
    "g5.xlarge": (1, "A10G", 4), "g5.2xlarge": (1, "A10G", 8), "g5.12xlarge": (4, "A10G", 48),
    "p4d.24xlarge": (8, "A100", 96), "p5.48xlarge": (8, "H100", 192),
    "n2-standard-8": (0, None, 8), "n2-standard-32": (0, None, 32),
    "g2-standard-8": (1, "L4", 8), "g2-standard-48": (4, "L4", 48),
    "a2-highgpu-8g": (8, "A100", 96), "a3-highgpu-8g": (8, "H100", 208),
}
GPU_STAGES = ("synth", "filter", "train", "serve")      # stages with their own GPU worker group
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRICS_IMPORT = re.compile(r"^\s*(from ray\.util\.metrics import|import ray\.util\.metrics|from ray\.util import metrics)",
                            re.M)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


@cache
def _ray_pin() -> str:
    pins = dict(line.split("==") for line in (CLUSTER / "image" / "constraints-gpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins["ray"]


@cache
def _package_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


# ----------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_every_cluster_and_dashboard_file_parses(path):
    documents = [json.loads(path.read_text())] if path.suffix == ".json" else \
        list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert documents and all(isinstance(doc, dict) for doc in documents)


def test_the_checked_directories_are_not_empty():
    assert LAUNCHER and KUBERAY and DASHBOARD_FILES


# ---------------------------------------------------------------------------- cluster launcher
def _node_types(path: Path) -> dict[str, dict]:
    config = _yaml(path)
    return {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}


def _machine(node_type: dict) -> str:
    config = node_type["node_config"]
    return config.get("InstanceType") or config["machineType"]


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_yaml(path)))


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_workers_scale_from_zero_with_a_gpu_group_per_stage(path):
    config = _yaml(path)
    assert config["idle_timeout_minutes"] > 0
    workers = _node_types(path)
    assert all(spec["min_workers"] == 0 for spec in workers.values()), "every worker type must start at 0"
    for stage in GPU_STAGES:
        groups = [name for name, spec in workers.items() if stage in name and spec["resources"].get("GPU", 0) > 0]
        assert groups, f"{path.name}: no GPU node type for {stage}"


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_resources_match_the_machines(path):
    config = _yaml(path)
    for name, spec in config["available_node_types"].items():
        machine = _machine(spec)
        assert machine in MACHINES, f"{name}: add {machine} to MACHINES"
        gpus, model, vcpus = MACHINES[machine]
        resources = spec["resources"]
        assert resources.get("GPU", 0) == gpus, f"{name}: {machine} has {gpus} GPUs"
        assert resources.get("CPU", vcpus) <= vcpus, f"{name}: {machine} has {vcpus} vCPUs"
        declared = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
        assert declared == ([model] if gpus else []), f"{name}: accelerator_type must be {model}"


def _train_presets() -> list[tuple[str, dict]]:
    presets = [(p.name, _yaml(p)) for p in sorted((REPO / "jobs" / "configs").glob("train_*.yaml"))]
    return [(name, preset["scaling"]) for name, preset in presets if preset.get("scaling", {}).get("use_gpu")]


def _vllm_synth_configs() -> list[tuple[str, int]]:
    """(config, GPUs its engines take) for every synth config with the vLLM backend."""
    found = []
    for path in sorted((REPO / "jobs" / "configs").glob("synth*.yaml")):
        backend = _yaml(path)["synth"]["backend"]
        if backend["kind"] == "vllm":
            found.append((path.name, backend["concurrency"] * backend.get("tensor_parallel_size", 1)
                          * backend.get("pipeline_parallel_size", 1)))
    return found


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_gpu_groups_fit_every_train_preset_and_synth_config(path):
    workers = _node_types(path)
    train = [spec for name, spec in workers.items() if "train" in name]
    presets = _train_presets()
    assert presets, "no GPU train preset in jobs/configs"
    for preset, scaling in presets:   # every preset runs its workers on one node
        assert any(spec["resources"]["GPU"] >= scaling["num_workers"]
                   and spec["resources"]["CPU"] >= scaling["num_workers"] * scaling["cpus_per_worker"]
                   for spec in train), f"{path.name}: no train node fits {preset}"
    synth = [spec for name, spec in workers.items() if "synth" in name]
    for config, gpus in _vllm_synth_configs():
        capacity = max(spec["max_workers"] * spec["resources"]["GPU"] for spec in synth)
        assert capacity >= gpus, f"{path.name}: synth nodes hold {capacity} GPUs, {config} needs {gpus}"


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_installs_the_repository_with_its_pins(path):
    config = _yaml(path)
    assert config["file_mounts"] == {"~/babelforge": "."}
    commands = [*config["setup_commands"], *(c for spec in config["available_node_types"].values()
                                           for c in spec.get("worker_setup_commands", []))]
    referenced = {m.group(1) for c in commands for m in re.finditer(r"(?:~|\$HOME)/babelforge/([\w./-]+\.txt)", c)}
    assert referenced, "setup commands should install with the cluster/image pins"
    assert all((REPO / path).is_file() for path in referenced), referenced
    assert config["docker"]["image"].startswith(f"rayproject/ray:{_ray_pin()}-")


# ------------------------------------------------------------------------------------------ KubeRay
def _kuberay(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(p.name, doc["spec"]) for p, doc in _kuberay("RayCluster")]
    specs += [(p.name, doc["spec"]["rayClusterSpec"]) for p, doc in _kuberay("RayJob")]
    specs += [(p.name, doc["spec"]["rayClusterConfig"]) for p, doc in _kuberay("RayService")]
    return specs


CLUSTER_SPECS = _cluster_specs()
RAYJOBS = _kuberay("RayJob")


def _pods(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _gpus(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _cpus(group: dict) -> float:
    return float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def _image_target(image: str) -> str:
    match = re.fullmatch(r"[^:]+/babelforge:(?P<version>[^-]+)-(?P<target>[a-z0-9]+)", image)
    assert match, f"image {image} is not REGISTRY/babelforge:VERSION-TARGET"
    assert match["version"] == _package_version(), f"{image}: the package is {_package_version()}"
    return match["target"]


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_clusters_run_the_pinned_ray_with_autoscaler_v2(name, spec):
    assert spec["rayVersion"] == _ray_pin()
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {e["name"]: e.get("value") for e in head.get("env", [])}
    assert spec["autoscalerOptions"].get("version") == "v2" or head_env.get("RAY_enable_autoscaler_v2") == "1"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_images_are_targets_of_the_dockerfile():
    dockerfile = DOCKERFILE.read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.M)) - {"base"}
    assert f"rayproject/ray:{_ray_pin()}-" in dockerfile
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        assert all((REPO / s).exists() for s in source.split()), source
    for pins in re.findall(r"-[cr] (cluster/image/\S+)", dockerfile):
        assert (REPO / pins).is_file(), pins
    for name, spec in CLUSTER_SPECS:
        for group, pod in _pods(spec):
            for container in pod["containers"]:
                assert _image_target(container["image"]) in targets, f"{name} {group}: {container['image']}"


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_worker_groups_request_consistent_resources(name, spec):
    for group in spec["workerGroupSpecs"]:
        label = f"{name} {group['groupName']}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
        pod = group["template"]["spec"]
        assert pod["restartPolicy"] == "Never", f"{label}: autoscaler v2 needs restartPolicy Never"
        resources = pod["containers"][0]["resources"]
        assert resources["limits"] == resources["requests"], f"{label}: requests must equal limits"
        assert {"cpu", "memory"} <= set(resources["limits"]), label
        if _gpus(group):
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), label


def test_the_long_lived_cluster_scales_every_group_from_zero():
    (path, cluster), = _kuberay("RayCluster")
    groups = cluster["spec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 and g["replicas"] == 0 for g in groups)
    for stage in GPU_STAGES:
        assert any(stage in g["groupName"] and _gpus(g) for g in groups), f"no GPU group for {stage}"


def _config_model(script: Path) -> type:
    """The config model of a job script: ``jobs/<x>.py`` runs ``babelforge <command>``, whose module
    declares ``CONFIG_MODEL``."""
    from babelforge.cli import STAGES
    from babelforge.cluster.submit import _JOB_SCRIPTS

    command = {job: stage for stage, job in _JOB_SCRIPTS.items()}.get(script.stem, script.stem)
    assert command in STAGES, f"{script}: no babelforge command {command!r}"
    module = importlib.import_module(STAGES[command][0])
    assert hasattr(module, "CONFIG_MODEL"), f"{STAGES[command][0]} declares no CONFIG_MODEL"
    return module.CONFIG_MODEL


def _parse_entrypoint(entrypoint: str) -> tuple[Path, str, list[str], dict[str, str]]:
    """(script, config, --set overrides, other --options) of ``python jobs/x.py --config ... --set ...``."""
    tokens = shlex.split(entrypoint)
    assert tokens[0] == "python", entrypoint
    script, config, overrides, options = REPO / tokens[1], None, [], {}
    for option, value in zip(tokens[2::2], tokens[3::2]):
        if option == "--config":
            config = value
        elif option == "--set":
            overrides.append(value)
        else:
            options[option.removeprefix("--")] = value
    assert len(tokens) % 2 == 0, f"dangling argument in {entrypoint!r}"
    return script, config, overrides, options


@pytest.mark.parametrize("path, job", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_rayjobs_run_existing_jobs_whose_configs_validate(path, job):
    spec = job["spec"]
    script, config, overrides, options = _parse_entrypoint(spec["entrypoint"])
    assert script.is_file(), f"{path.name}: no entry point {script.relative_to(REPO)}"
    assert config and (REPO / config).is_file(), f"{path.name}: no config {config}"
    model = _config_model(script)
    for option, value in options.items():   # e.g. evaluate.py --model X, which sets the config's `model`
        assert option in model.model_fields, f"{path.name}: --{option} is not a key of {model.__name__}"
        overrides.append(f"{option}={value}")
    load_config(REPO / config, model, overrides)   # raises ConfigError naming any bad key or value
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir, "jobs/ must resolve in the image's repository copy"


@pytest.mark.parametrize("path, job", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_rayjob_gpus_match_what_the_job_asks_for(path, job):
    cluster = job["spec"]["rayClusterSpec"]
    script, config, overrides, _ = _parse_entrypoint(job["spec"]["entrypoint"])
    cfg = load_config(REPO / config, _config_model(script), overrides)
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g)]
    gpus = sum(g["maxReplicas"] * _gpus(g) for g in gpu_groups)
    images = {_image_target(c["image"]) for _, pod in _pods(cluster) for c in pod["containers"]}
    stage = script.stem
    backend = getattr(getattr(cfg, "synth", None), "backend", None)   # synth job, or a pipeline's synth section
    uses_vllm = getattr(backend, "kind", None) == "vllm"
    assert images == ({"vllm"} if uses_vllm else {"gpu"}), f"{path.name}: vLLM jobs run the vllm image, others gpu"
    if stage == "train":
        scaling = cfg.scaling
        assert gpus == (scaling.num_workers if scaling.use_gpu else 0), \
            f"{path.name}: {gpus} GPUs for {scaling.num_workers} workers of {config}"
        per_pod = _gpus(gpu_groups[0])
        assert _cpus(gpu_groups[0]) >= per_pod * scaling.cpus_per_worker, f"{path.name}: CPUs for the workers"
    elif uses_vllm:
        assert gpus == backend.concurrency * backend.tensor_parallel_size * backend.pipeline_parallel_size, path.name
    else:
        # Encoder actor pools (filter, mine, eval) take one actor per GPU present when the stage
        # starts, so their GPU groups are fixed-size; ingest uses no GPU at all.
        assert all(g["minReplicas"] == g["maxReplicas"] for g in gpu_groups), path.name
        assert stage != "ingest" or not gpu_groups, f"{path.name}: ingest runs on CPUs"


def _key_tree(value: Any) -> Any:
    return {k: _key_tree(v) for k, v in value.items()} if isinstance(value, dict) else None


def test_rayservice_serves_the_serve_config_on_gpu_replicas(tmp_path):
    from babelforge.serve.config import load_serve_config

    (path, service), = _kuberay("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    reference = _yaml(REPO / "serve" / "config.yaml")
    app, reference_app = serve_config["applications"][0], reference["applications"][0]
    assert _key_tree(app["args"]) == _key_tree(reference_app["args"])
    assert {d["name"] for d in app["deployments"]} == {d["name"] for d in reference_app["deployments"]}
    module, attribute = app["import_path"].split(":")
    assert module.startswith("babelforge.") and callable(getattr(importlib.import_module(module), attribute))
    (tmp_path / "serve.yaml").write_text(service["spec"]["serveConfigV2"])
    cfg = load_serve_config(tmp_path / "serve.yaml")          # babelforge's own reader validates every key
    assert cfg.num_gpus >= 1
    groups = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if _gpus(g) >= cfg.num_gpus]
    assert groups and all(_cpus(g) >= cfg.num_cpus for g in groups), "a replica must fit a GPU pod"
    capacity = sum(g["maxReplicas"] * _gpus(g) for g in groups)
    assert cfg.autoscaling.max_replicas * cfg.num_gpus <= capacity, "max_replicas need more GPUs than the pods have"


# ---------------------------------------------------------------------------------------- dashboards
def dashboard_queries(dashboard: dict) -> Iterator[str]:
    """Every PromQL expression of a Grafana dashboard (rows' nested panels included)."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
        for nested in panel.get("panels", []):
            yield from (t["expr"] for t in nested.get("targets", []))


def queried_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers and `by (...)` label lists removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b(ray_[a-zA-Z0-9_]+)\b", expr))


def dashboard_metric_names(path: Path) -> set[str]:
    return {name for expr in dashboard_queries(json.loads(path.read_text())) for name in queried_metric_names(expr)}


@cache
def babelforge_metric_names() -> frozenset[str]:
    """Scraped names (``EXPORTED_NAMES``) of every babelforge module that defines Ray metrics."""
    names: set[str] = set()
    package = REPO / "platform" / "babelforge"
    for path in sorted(package.rglob("*.py")):
        if not METRICS_IMPORT.search(path.read_text(encoding="utf-8")):
            continue
        module = importlib.import_module(".".join(path.relative_to(package.parent).with_suffix("").parts))
        assert hasattr(module, "EXPORTED_NAMES"), f"{module.__name__} defines Ray metrics without EXPORTED_NAMES"
        names.update(module.EXPORTED_NAMES)
    return frozenset(names)


@cache
def ray_source_literals() -> frozenset[str]:
    """String literals of Ray's installed source: where Ray's own metric names are defined."""
    root = Path(ray.__file__).parent
    literal = re.compile(r"""["']([a-z][a-z0-9_]{3,})["']""")
    found: set[str] = set()
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                found.update(literal.findall(Path(directory, name).read_text(encoding="utf-8", errors="ignore")))
    return frozenset(found)


def undefined_metric_names(names: set[str]) -> set[str]:
    """Names neither babelforge nor Ray defines (histogram series map to their histogram)."""
    missing = set()
    for name in names:
        base = next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        if name.startswith("ray_babelforge_"):
            if base not in babelforge_metric_names():
                missing.add(name)
        elif base.removeprefix("ray_").removesuffix("_total") not in ray_source_literals():
            missing.add(name)
    return missing


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=_ids(DASHBOARD_FILES))
def test_dashboards_are_complete_grafana_models(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("babelforge-") and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    panels = [*dashboard["panels"], *(n for p in dashboard["panels"] for n in p.get("panels", []))]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__range", "__rate_interval", "__interval"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert not undefined_metric_names(queried_metric_names(variable["definition"])), variable["name"]


def test_dashboard_uids_are_unique():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=_ids(DASHBOARD_FILES))
def test_every_queried_metric_is_one_the_code_defines(path):
    names = dashboard_metric_names(path)
    assert names
    assert not undefined_metric_names(names), f"{path.name} queries metrics nobody exports"


def test_prometheus_scrapes_ray_service_discovery_and_kuberay_metrics_ports():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = _yaml(DASHBOARDS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    discovery_files = [f for job in jobs.values() for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert any(Path(f).name == PROMETHEUS_SERVICE_DISCOVERY_FILE for f in discovery_files)
    kept_ports = {r["regex"] for job in jobs.values() for r in job.get("relabel_configs", [])
                  if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]}
    for name, spec in CLUSTER_SPECS:
        for group, pod in _pods(spec):
            ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
            assert kept_ports & set(ports), f"{name} {group}: no port Prometheus keeps"
    for path in LAUNCHER:   # VMs: a fixed export port on every node
        config = _yaml(path)
        for command in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]):
            if "ray start" in command:
                assert "--metrics-export-port=" in command, path.name


def test_the_operations_guide_covers_every_manifest_and_train_preset():
    guide = (REPO / "docs" / "operations.md").read_text()
    rayjobs = {p.stem.removeprefix("rayjob-") for p in KUBERAY if p.stem.startswith("rayjob-")}
    listed = re.search(r"rayjob-\{([^}]*)\}\.yaml", guide)
    assert listed and set(listed.group(1).split(",")) == rayjobs, "docs/operations.md must list every RayJob"
    others = [p for p in [*LAUNCHER, *KUBERAY, *DASHBOARD_FILES] if not p.stem.startswith("rayjob-")]
    assert all(p.name in guide for p in others), [p.name for p in others if p.name not in guide]
    presets = [p.name for p in sorted((REPO / "jobs" / "configs").glob("train_*.yaml"))]
    assert all(f"`{name}`" in guide for name in presets), [n for n in presets if f"`{n}`" not in guide]
