"""Bearer API-key authentication for the embedding server.

Keys come from an environment variable (comma-separated) and/or a file (one key per line, ``#``
comments allowed). Only SHA-256 digests of the keys are kept, every candidate is compared with
``hmac.compare_digest`` against every key digest (no early exit, equal-length digests), and no
message or log line ever contains a key::

    >>> auth = ApiKeyAuth(["s3cret"])
    >>> auth.verify("Bearer s3cret")
    >>> try:
    ...     auth.verify("Bearer guess")
    ... except APIError as err:
    ...     print(err.status, err.code)
    401 invalid_api_key
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable

from babelforge.errors import ConfigError
from babelforge.serve.config import AuthConfig
from babelforge.serve.protocol import APIError

__all__ = ["ApiKeyAuth", "load_api_keys"]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyAuth:
    """Checks ``Authorization: Bearer <key>`` headers against a fixed set of keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyAuth needs at least one key")

    @classmethod
    def from_config(cls, config: AuthConfig) -> "ApiKeyAuth | None":
        """The configured checker, or None when no key is configured and auth is not required."""
        keys = load_api_keys(config)
        if keys:
            return cls(keys)
        if config.required:
            sources = [f"environment variable {config.api_keys_env}" if config.api_keys_env else None,
                       f"file {config.api_keys_file}" if config.api_keys_file else None]
            where = " or ".join(s for s in sources if s) or "nowhere (set auth.api_keys_env or auth.api_keys_file)"
            raise ConfigError(f"auth.required is true but no API key was found in {where}")
        return None

    def is_valid(self, key: str) -> bool:
        candidate = _digest(key)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(candidate, known)
        return matched

    def verify(self, authorization: str | None) -> None:
        """Raise a 401 :class:`APIError` unless the header carries a known bearer key."""
        if not authorization:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key", error_type="authentication_error", headers=_CHALLENGE)
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'",
                           code="invalid_api_key", error_type="authentication_error", headers=_CHALLENGE)
        if not self.is_valid(key.strip()):
            raise APIError(401, "invalid API key", code="invalid_api_key", error_type="authentication_error",
                           headers=_CHALLENGE)

    def __repr__(self) -> str:
        return f"ApiKeyAuth(<{len(self._digests)} key(s)>)"


def load_api_keys(config: AuthConfig) -> list[str]:
    """Keys from the configured environment variable and file (blank lines and comments skipped)."""
    keys: list[str] = []
    if config.api_keys_env:
        keys += [k.strip() for k in os.environ.get(config.api_keys_env, "").split(",") if k.strip()]
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"auth.api_keys_file: {path} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys
