"""Configuration of the embedding server, and reading it from either of its two file formats.

:class:`ServeConfig` is the single description of a served model: which directory, how replicas
are sized, how requests are batched and limited, who may call it and where it listens. The same
object drives ``babelforge serve`` / :func:`babelforge.serve.start_server` and the Serve config
file used with ``serve run serve/config.yaml`` (whose application ``args`` are a ``ServeConfig``
minus the parts Serve's own file keeps: ``http_options``, ``route_prefix`` and the deployment's
``autoscaling_config`` / ``ray_actor_options``)::

    >>> cfg = ServeConfig(model_path="models/me5-small", limits={"max_inputs": 64})
    >>> cfg.served_model_name, cfg.limits.overflow
    ('me5-small', 'truncate')
    >>> cfg.deployment_options()["autoscaling_config"]
    {'min_replicas': 1, 'max_replicas': 1, 'target_ongoing_requests': 32.0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import Field, model_validator

from babelforge.config import StrictModel, apply_overrides, load_config_dict, read_yaml_mapping
from babelforge.errors import ConfigError

__all__ = ["ServeConfig", "BatchingConfig", "LimitsConfig", "AuthConfig", "AutoscalingConfig", "HttpConfig",
           "DEPLOYMENT_NAME", "load_serve_config"]

DEPLOYMENT_NAME = "EmbeddingDeployment"


class BatchingConfig(StrictModel):
    """Dynamic batching across concurrent requests (see :mod:`babelforge.serve.batcher`)."""

    max_batch_size: int = Field(64, gt=0, description="inputs per batch")
    max_batch_tokens: int = Field(16384, gt=0, description="tokens per batch, and padded tokens per forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="longest wait for a batch to fill")


class LimitsConfig(StrictModel):
    """Per-request limits; every violation is a 400 naming the offending field."""

    max_inputs: int = Field(512, gt=0, description="texts per request")
    max_chars: int = Field(16384, gt=0, description="characters per text")
    max_tokens: int | None = Field(None, gt=1, description="tokens per text incl. prompt; default: the model's")
    overflow: Literal["truncate", "reject"] = "truncate"


class AuthConfig(StrictModel):
    """Bearer API keys: comma-separated in an environment variable and/or one per line in a file."""

    api_keys_env: str | None = "BABELFORGE_API_KEYS"
    api_keys_file: str | None = None
    required: bool = False


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(32.0, gt=0)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas})")
        return self


class HttpConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)


class ServeConfig(StrictModel):
    model_path: str
    model_name: str | None = Field(None, description="name clients pass as `model`; default: the directory name")
    app_name: str = "babelforge-embedder"
    route_prefix: str = "/"
    device: str = Field("auto", description="auto (cuda when the replica has a GPU), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(128, gt=0, description="concurrent requests per replica (what gets batched)")
    default_input_type: str | None = Field(None, description="prompt name when a request gives none")
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    http: HttpConfig = HttpConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError(f"device={self.device!r} needs num_gpus > 0 (replicas without a GPU see no CUDA device)")
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_path.split(":", 1)[-1].rstrip("/")).name

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        return {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "autoscaling_config": self.autoscaling.model_dump(),
            "max_ongoing_requests": self.max_ongoing_requests,
        }


def load_serve_config(path: str | Path | None, model_path: str | None = None,
                      overrides: Iterable[str] = ()) -> ServeConfig:
    """Read a :class:`ServeConfig` YAML or a Ray Serve config file, then apply CLI values.

    A Ray Serve config file (top-level ``applications``) must hold one application; its ``args``,
    ``route_prefix``, ``name``, the file's ``http_options`` and the deployment's autoscaling,
    actor resources and ``max_ongoing_requests`` become the corresponding ``ServeConfig`` keys.
    ``model_path`` replaces the file's model; ``overrides`` are ``key.path=value`` strings.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(Path(path))
        if "applications" in data:
            data = _from_serve_file(data, source)
    if model_path is not None:
        data["model_path"] = str(model_path)
    overrides = list(overrides)
    if overrides:
        apply_overrides(data, overrides)
        source += " (with overrides " + ", ".join(overrides) + ")"
    return load_config_dict(data, ServeConfig, source)


def _from_serve_file(serve_file: dict[str, Any], source: str) -> dict[str, Any]:
    apps = serve_file.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{source}: applications: expected exactly one application, found {len(apps)}")
    app = apps[0]
    data: dict[str, Any] = dict(app.get("args") or {})
    if "name" in app:
        data["app_name"] = app["name"]
    if "route_prefix" in app:
        data["route_prefix"] = app["route_prefix"]
    http = serve_file.get("http_options") or {}
    if http:
        data["http"] = {k: http[k] for k in ("host", "port") if k in http}
    for deployment in app.get("deployments") or []:
        if deployment.get("name") != DEPLOYMENT_NAME:
            raise ConfigError(f"{source}: applications[0].deployments: unknown deployment "
                              f"{deployment.get('name')!r}; the embedder's deployment is {DEPLOYMENT_NAME!r}")
        if "autoscaling_config" in deployment:
            data["autoscaling"] = deployment["autoscaling_config"]
        actor = deployment.get("ray_actor_options") or {}
        for key in ("num_cpus", "num_gpus"):
            if key in actor:
                data[key] = actor[key]
        if "max_ongoing_requests" in deployment:
            data["max_ongoing_requests"] = deployment["max_ongoing_requests"]
    return data
