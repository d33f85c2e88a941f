"""The Ray Serve deployment: one replica = one loaded model + batcher + FastAPI app.

The FastAPI app is built per replica (``@serve.ingress()`` with ``__serve_build_asgi_app__``)
around that replica's :class:`~babelforge.serve.service.EmbeddingService`, API-key checker and
metrics. :func:`build_application` applies the config's replica resources, autoscaling and
concurrency to the deployment; :func:`build_app` is the same as a Serve "application builder"
(``import_path: babelforge.serve.deployment:build_app`` works wherever babelforge is installed)::

    >>> app = build_application(ServeConfig(model_path="models/me5-small"))   # doctest: +SKIP
    >>> serve.run(app, name="babelforge-embedder", route_prefix="/")          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from babelforge.utils import ray_env  # noqa: F401  (loopback for local Ray before ray is imported)

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from babelforge.config import load_config_dict
from babelforge.serve.api import build_api
from babelforge.serve.auth import ApiKeyAuth
from babelforge.serve.config import DEPLOYMENT_NAME, ServeConfig
from babelforge.serve.metrics import ServeMetrics
from babelforge.serve.service import EmbeddingService

log = logging.getLogger(__name__)

__all__ = ["EmbeddingDeployment", "build_application", "build_app"]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class EmbeddingDeployment:
    """A replica serving one model directory; constructed from ``ServeConfig.model_dump()``."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = load_config_dict(config, ServeConfig, source=f"{DEPLOYMENT_NAME} config")
        self._auth = ApiKeyAuth.from_config(cfg.auth)
        self._metrics = ServeMetrics(cfg.served_model_name)
        self._service = EmbeddingService.load(cfg, torch_threads=_assigned_cpus(),
                                              on_batch=self._metrics.record_batch)
        log.info("API-key auth %s", "on" if self._auth is not None else "off")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self._service, self._auth, self._metrics)

    def batch_stats(self) -> dict[str, int]:
        """Totals of this replica's batcher (called through a deployment handle, not HTTP)."""
        return dataclasses.asdict(self._service.batcher.stats)


def build_application(config: ServeConfig) -> Application:
    """The Serve application for ``config`` (deployment options from its resources and autoscaling)."""
    return EmbeddingDeployment.options(**config.deployment_options()).bind(config.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are the keys of :class:`ServeConfig` (``import_path`` target)."""
    return build_application(load_config_dict(args, ServeConfig, source="serve application args"))


def _assigned_cpus() -> int:
    """Torch threads for this replica: the whole CPUs Ray assigned to it (at least one)."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
