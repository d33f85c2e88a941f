"""Start, query and stop the embedding server from Python (the main job, tests, the CLI).

:func:`start_server` joins or starts Ray, starts Serve's HTTP proxy on the configured host and
port, deploys the application and returns once ``/health`` answers. The returned
:class:`RunningServer` knows its URL (``openai_base_url`` for the ``openai`` client), can embed
texts itself and stops the application (and Serve, when no other application is left)::

    >>> cfg = ServeConfig(model_path="runs/main/model", http={"port": 8000})   # doctest: +SKIP
    >>> with start_server(cfg) as server:                                     # doctest: +SKIP
    ...     vectors = server.embed(["Wie hoch ist der Eiffelturm?"], input_type="query", dimensions=256)
    ...     client = openai.OpenAI(base_url=server.openai_base_url, api_key="unused")
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from babelforge.errors import BabelforgeError, ModelLoadError
from babelforge.serve.config import ServeConfig
from babelforge.utils.ray_env import init_ray

log = logging.getLogger(__name__)

__all__ = ["RunningServer", "start_server", "stop_server"]


@dataclass
class RunningServer:
    """A deployed embedding application and the URL that reaches it."""

    config: ServeConfig
    url: str
    api_key: str | None = field(default=None, repr=False)

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def embed(self, texts: Sequence[str], *, input_type: str | None = None, dimensions: int | None = None,
              timeout_s: float = 120.0) -> np.ndarray:
        """POST ``texts`` to ``/v1/embeddings``; returns a float32 array ``[len(texts), dim]``."""
        body: dict[str, Any] = {"input": list(texts), "model": self.config.served_model_name,
                                "encoding_format": "base64"}
        if input_type is not None:
            body["input_type"] = input_type
        if dimensions is not None:
            body["dimensions"] = dimensions
        response = httpx.post(f"{self.url}/v1/embeddings", json=body, headers=self.headers(), timeout=timeout_s)
        if response.status_code != 200:
            raise BabelforgeError(f"POST {self.url}/v1/embeddings: HTTP {response.status_code}: "
                                  f"{_error_message(response)}")
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])

    def stop(self) -> None:
        stop_server(self.config.app_name)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(config: ServeConfig, api_key: str | None = None, ready_timeout_s: float = 300.0) -> RunningServer:
    """Deploy ``config`` on Ray Serve and wait until it answers; ``api_key`` is for :meth:`RunningServer.embed`."""
    from ray import serve

    from babelforge.models.sources import resolve_model_dir
    from babelforge.serve.deployment import build_application

    model_dir = resolve_model_dir(config.model_path).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model_path: {model_dir} is not a model directory (no config.json)")
    # Replicas may run with another working directory (or on another node): ship an absolute path.
    config = config.model_copy(update={"model_path": str(model_dir)})
    init_ray()
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_application(config), name=config.app_name, route_prefix=config.route_prefix)
    url = _base_url(config)
    _wait_until_healthy(f"{url}/health", ready_timeout_s)
    log.info("serving %s at %s", config.served_model_name, url)
    return RunningServer(config, url, api_key)


def stop_server(app_name: str) -> None:
    """Delete the application; shut Serve down when it was the last one."""
    from ray import serve

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):  # not one of our JSON errors (e.g. the proxy's 503 text)
        return response.text[:500]


def _base_url(config: ServeConfig) -> str:
    from ray.serve.context import _get_global_client

    # Serve keeps the HTTP options of its first start; ask it where the proxy really listens.
    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    if http.host != config.http.host or http.port != config.http.port:
        log.warning("Serve was already running on %s:%s; http.host/http.port of this config are ignored",
                    http.host, http.port)
    return f"http://{host}:{http.port}{config.route_prefix.rstrip('/')}"


def _wait_until_healthy(url: str, timeout_s: float) -> None:
    """Serve reports RUNNING before every proxy routes to the app; poll until it does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(0.2)
    raise BabelforgeError(f"{url} did not become healthy within {timeout_s:.0f} s (last: {last})")
