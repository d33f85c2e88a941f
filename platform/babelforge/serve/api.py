"""The HTTP API of a replica: a FastAPI app built around an :class:`EmbeddingService`.

Routes: ``POST /v1/embeddings`` (OpenAI), ``POST /embed`` (text-embeddings-inference style),
``GET /v1/models`` and ``GET /health`` (never behind auth, for probes). Every error, including
unknown routes and unexpected failures, is an OpenAI-style JSON body; a middleware records
request counts and latency, and each error response its code::

    >>> app = build_api(service, auth=ApiKeyAuth(["k"]), metrics=ServeMetrics("m"))   # doctest: +SKIP
    >>> # POST /v1/embeddings {"input": ["hi"], "model": "m", "dimensions": 8, "input_type": "query"}
    >>> # -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}],
    >>> #     "model": "m", "usage": {"prompt_tokens": 6, "total_tokens": 6}}
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from babelforge.serve.protocol import (APIError, embeddings_response, models_response, parse_embed_request,
                                       parse_embeddings_request)

if TYPE_CHECKING:
    from babelforge.serve.auth import ApiKeyAuth
    from babelforge.serve.metrics import ServeMetrics
    from babelforge.serve.service import EmbeddingService

log = logging.getLogger(__name__)

__all__ = ["build_api"]

_UNMATCHED_ROUTE = "unmatched"


def build_api(service: "EmbeddingService", auth: "ApiKeyAuth | None", metrics: "ServeMetrics") -> FastAPI:
    app = FastAPI(title=f"babelforge embedder: {service.model_name}", openapi_url=None, docs_url=None,
                  redoc_url=None)
    protected = [Depends(_bearer_dependency(auth))] if auth is not None else []

    def error_response(request: Request, err: APIError) -> JSONResponse:
        metrics.record_error(_route_label(request), err.status, err.code or "error")
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            response = error_response(request, APIError(500, "internal server error", code="internal_error",
                                                        error_type="server_error"))
        metrics.record_request(_route_label(request), response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(request, APIError(err.status_code, message, code=code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **service.describe()}

    @app.get("/v1/models", dependencies=protected)
    async def list_models() -> dict[str, Any]:
        return models_response(service.model_name, service.dimensions, service.max_tokens, service.input_types,
                               created=service.created)

    @app.post("/v1/embeddings", dependencies=protected)
    async def create_embeddings(request: Request) -> JSONResponse:
        body = parse_embeddings_request(await request.body())
        service.check_model(body.model)
        result = await service.embed(body.inputs, input_type=body.input_type, dimensions=body.dimensions)
        return JSONResponse(embeddings_response(result.vectors, service.model_name, result.prompt_tokens,
                                                body.encoding_format))

    @app.post("/embed", dependencies=protected)
    async def embed(request: Request) -> JSONResponse:
        body = parse_embed_request(await request.body())
        result = await service.embed(body.inputs, input_type=body.prompt_name, input_type_param="prompt_name",
                                     dimensions=body.dimensions, normalize=body.normalize, truncate=body.truncate)
        return JSONResponse(result.vectors.tolist())

    return app


def _bearer_dependency(auth: "ApiKeyAuth") -> Callable[[Request], Awaitable[None]]:
    async def require_api_key(request: Request) -> None:
        auth.verify(request.headers.get("authorization"))

    return require_api_key


def _route_label(request: Request) -> str:
    """The matched route template (bounded label values), never the raw path."""
    route = request.scope.get("route")
    return getattr(route, "path", _UNMATCHED_ROUTE)
