"""Persona library: who the synthetic queries are written for.

A persona library is a JSON Lines file (UTF-8, one persona per line, blank lines ignored)::

    {"id": "icu-nurse", "domain": "healthcare", "persona": "An intensive-care nurse who ..."}

``persona`` is required (one English sentence); ``id`` defaults to ``<file stem>-<line>`` and
must be unique; ``domain`` is optional. Other keys are ignored, so PersonaHub-style files
(``{"persona": ...}``) from a source you may use load unchanged. The bundled starter set
(``babelforge/resources/personas/starter.jsonl``) is babelforge's own, Apache-2.0.

    >>> personas = load_personas()
    >>> len(personas) > 100, personas[0].id
    (True, 'icu-nurse')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from babelforge.errors import DataFormatError

__all__ = ["Persona", "load_personas", "starter_personas_path"]


@dataclass(frozen=True)
class Persona:
    """One persona of the library."""

    id: str
    persona: str
    domain: str = ""


def starter_personas_path() -> Path:
    """The bundled starter library."""
    return Path(str(resources.files("babelforge.resources"))) / "personas" / "starter.jsonl"


def load_personas(path: str | Path | None = None) -> list[Persona]:
    """Read a persona library (the bundled starter set when ``path`` is None).

    Raises :class:`DataFormatError` naming the file and line of a malformed record.
    """
    path = Path(path) if path is not None else starter_personas_path()
    if not path.is_file():
        raise DataFormatError(f"persona library {path} does not exist")
    personas: list[Persona] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get("persona")
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where}: field 'persona' must be a non-empty string")
        persona_id = record.get("id", f"{path.stem}-{number}")
        if not isinstance(persona_id, str) or not persona_id.strip():
            raise DataFormatError(f"{where}: field 'id' must be a non-empty string")
        if persona_id in seen:
            raise DataFormatError(f"{where}: duplicate id {persona_id!r} (first on line {seen[persona_id]})")
        seen[persona_id] = number
        domain = record.get("domain", "")
        if not isinstance(domain, str):
            raise DataFormatError(f"{where}: field 'domain' must be a string")
        personas.append(Persona(id=persona_id, persona=" ".join(text.split()), domain=domain))
    if not personas:
        raise DataFormatError(f"persona library {path} has no personas")
    return personas
