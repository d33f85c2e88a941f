"""Typed, validated configuration shared by every job.

Every job config is a pydantic model derived from :class:`StrictModel` (unknown keys are errors,
so a typo never silently falls back to a default). :func:`load_config` reads YAML, applies
``key.path=value`` overrides from the command line and turns validation failures into a
:class:`~babelforge.errors.ConfigError` whose message names the file and every bad key::

    >>> from pydantic import BaseModel
    >>> class Eval(StrictModel):
    ...     batch_size: int = 32
    >>> load_config_dict({"batch_size": "many"}, Eval, source="eval.yaml")
    Traceback (most recent call last):
    ...
    babelforge.errors.ConfigError: eval.yaml: invalid configuration
      - batch_size: Input should be a valid integer, unable to parse string as an integer (got 'many')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from babelforge.errors import ConfigError

__all__ = ["StrictModel", "load_config", "load_config_dict", "read_yaml_mapping", "apply_overrides", "dump_config"]

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _format_loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        loc = _format_loc(item.get("loc", ()))
        msg = item.get("msg", "invalid value")
        if item.get("type") == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README)"
        got = item.get("input")
        detail = f" (got {got!r})" if item.get("type") not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)) else ""
        lines.append(f"  - {loc}: {msg}{detail}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. eval.batch_size=64")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r}: empty key")
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config_dict(data: dict[str, Any] | None, model: type[ModelT], source: str = "<config>") -> ModelT:
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None, model: type[ModelT], overrides: Iterable[str] = ()) -> ModelT:
    """Load a YAML file (or only defaults when ``path`` is None) into ``model``."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path)
    overrides = list(overrides)
    if overrides:
        apply_overrides(data, overrides)
        source += " (with overrides " + ", ".join(overrides) + ")"
    return load_config_dict(data, model, source)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
