"""Wire formats of the embedding server: request parsing, OpenAI-style errors, response bodies.

No web framework and no Ray in here: functions take the raw request body and return plain dicts,
so the shapes are easy to test and match the official ``openai`` client types exactly
(``CreateEmbeddingResponse``, ``Embedding``; base64 = little-endian float32 bytes). Every
problem raises :class:`APIError`, whose ``param`` names the offending field (``input[3]``,
``dimensions``, ``model``)::

    >>> req = parse_embeddings_request(b'{"input": ["hi", "ho"], "model": "m", "dimensions": 8}')
    >>> req.inputs.texts, req.dimensions, req.encoding_format
    (['hi', 'ho'], 8, 'float')
    >>> try:
    ...     parse_embeddings_request(b'{"input": ["hi", 5]}')
    ... except APIError as err:
    ...     print(err.status, err.param, err.code)
    400 input[1] invalid_type
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["APIError", "TextInputs", "EmbeddingsRequest", "EmbedRequest", "parse_embeddings_request",
           "parse_embed_request", "embeddings_response", "models_response", "encode_base64"]

EncodingFormat = Literal["float", "base64"]


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class TextInputs:
    """The texts of a request and how to name each one in an error (``input`` or ``input[3]``)."""

    texts: list[str]
    field: str
    single: bool

    def param(self, index: int) -> str:
        return self.field if self.single else f"{self.field}[{index}]"


@dataclass(frozen=True)
class EmbeddingsRequest:
    """``POST /v1/embeddings`` (OpenAI) plus ``input_type``, the prompt name (query, passage...)."""

    inputs: TextInputs
    model: str | None
    dimensions: int | None
    encoding_format: EncodingFormat
    input_type: str | None
    user: str | None


@dataclass(frozen=True)
class EmbedRequest:
    """``POST /embed`` in the text-embeddings-inference style."""

    inputs: TextInputs
    normalize: bool | None
    truncate: bool | None
    prompt_name: str | None
    dimensions: int | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _EmbeddingsBody(_Body):
    input: Any = Field(...)
    model: str | None = None
    dimensions: int | None = Field(None, gt=0)
    encoding_format: EncodingFormat = "float"
    input_type: str | None = None
    user: str | None = None


class _EmbedBody(_Body):
    inputs: Any = Field(...)
    normalize: bool | None = None
    truncate: bool | None = None
    prompt_name: str | None = None
    dimensions: int | None = Field(None, gt=0)


BodyT = TypeVar("BodyT", bound=_Body)


def parse_embeddings_request(raw: bytes) -> EmbeddingsRequest:
    body = _validate(raw, _EmbeddingsBody)
    return EmbeddingsRequest(inputs=parse_texts(body.input, "input"), model=body.model, dimensions=body.dimensions,
                             encoding_format=body.encoding_format, input_type=body.input_type, user=body.user)


def parse_embed_request(raw: bytes) -> EmbedRequest:
    body = _validate(raw, _EmbedBody)
    return EmbedRequest(inputs=parse_texts(body.inputs, "inputs"), normalize=body.normalize, truncate=body.truncate,
                        prompt_name=body.prompt_name, dimensions=body.dimensions)


def parse_texts(value: Any, field: str) -> TextInputs:
    """A string or a non-empty list of strings; token-id arrays are not accepted."""
    if isinstance(value, str):
        return TextInputs([value], field, single=True)
    if not isinstance(value, list):
        raise APIError(400, f"{field}: expected a string or a list of strings, got {_json_type(value)}",
                       param=field, code="invalid_type")
    if not value:
        raise APIError(400, f"{field}: the list of inputs is empty", param=field, code="empty_input")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            hint = " (token-id inputs are not supported; send text)" if isinstance(item, (int, list)) else ""
            raise APIError(400, f"{field}[{i}]: expected a string, got {_json_type(item)}{hint}",
                           param=f"{field}[{i}]", code="invalid_type")
    return TextInputs(list(value), field, single=False)


def _validate(raw: bytes, model: type[BodyT]) -> BodyT:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_type(data)}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        kind = first["type"]
        if kind == "extra_forbidden":
            raise APIError(400, f"{param}: unknown parameter", param=param, code="unknown_parameter") from None
        if kind == "missing":
            raise APIError(400, f"{param}: required parameter is missing", param=param,
                           code="missing_parameter") from None
        raise APIError(400, f"{param}: {first['msg']} (got {first.get('input')!r})", param=param,
                       code="invalid_value") from None


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def encode_base64(vector: np.ndarray) -> str:
    """The OpenAI base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def embeddings_response(vectors: np.ndarray, model: str, prompt_tokens: int,
                        encoding_format: EncodingFormat) -> dict[str, Any]:
    """A ``CreateEmbeddingResponse`` body."""
    if encoding_format == "base64":
        encoded: Sequence[Any] = [encode_base64(v) for v in vectors]
    else:
        encoded = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_response(model: str, dimensions: list[int], max_tokens: int, input_types: list[str],
                    created: int) -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's model list, each entry extended with what the model serves."""
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created,
        "owned_by": "babelforge", "dimensions": dimensions, "max_tokens": max_tokens, "input_types": input_types,
    }]}
