"""Data bundled with babelforge, so the default pipeline runs on a fresh machine with no downloads.

- ``data/ntrex``: NTREX-128 (CC BY-SA 4.0, see ``data/ntrex/LICENSE.md``): 1,997 news sentences,
  professionally translated; line N of every file is the same sentence. 16 languages here.
- ``data/tatoeba``: the LASER Tatoeba test sets (see ``data/tatoeba/README.md``): 1,000 English
  sentences with translations, per language pair.

Languages are named by ISO 639-1 codes throughout babelforge (``de``, ``zh``, ``ar``...);
:data:`NTREX_FILES` and :data:`TATOEBA_CODES` map them to the file names of each corpus.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["data_dir", "ntrex_file", "ntrex_document_ids", "tatoeba_files", "check_languages", "NTREX_FILES",
           "TATOEBA_CODES", "LANGUAGE_NAMES", "SCRIPTS"]

NTREX_FILES = {
    "en": "ntrex.eng-US.txt", "de": "ntrex.deu.txt", "es": "ntrex.spa.txt", "fr": "ntrex.fra.txt",
    "zh": "ntrex.zho-CN.txt", "ja": "ntrex.jpn.txt", "ar": "ntrex.arb.txt", "hi": "ntrex.hin.txt",
    "ru": "ntrex.rus.txt", "pl": "ntrex.pol.txt", "sw": "ntrex.swa.txt", "th": "ntrex.tha.txt",
    "tr": "ntrex.tur.txt", "vi": "ntrex.vie.txt", "id": "ntrex.ind.txt", "pt": "ntrex.por.txt",
}

TATOEBA_CODES = {
    "de": "deu", "es": "spa", "fr": "fra", "zh": "cmn", "ja": "jpn", "ar": "ara", "hi": "hin", "ru": "rus",
    "pl": "pol", "sw": "swh", "th": "tha", "tr": "tur", "vi": "vie", "id": "ind", "pt": "por",
}

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "es": "Spanish", "fr": "French", "zh": "Chinese", "ja": "Japanese",
    "ar": "Arabic", "hi": "Hindi", "ru": "Russian", "pl": "Polish", "sw": "Swahili", "th": "Thai",
    "tr": "Turkish", "vi": "Vietnamese", "id": "Indonesian", "pt": "Portuguese",
}

SCRIPTS = {
    "en": "Latin", "de": "Latin", "es": "Latin", "fr": "Latin", "pl": "Latin", "sw": "Latin", "tr": "Latin",
    "vi": "Latin", "id": "Latin", "pt": "Latin", "ru": "Cyrillic", "ar": "Arabic", "hi": "Devanagari",
    "zh": "Han", "ja": "Japanese", "th": "Thai",
}


def data_dir() -> Path:
    """Directory holding the bundled corpora."""
    return Path(str(resources.files("babelforge.resources"))) / "data"


def _check_lang(lang: str, table: dict[str, str], corpus: str) -> str:
    if lang not in table:
        raise KeyError(f"{corpus} has no language {lang!r}; available: {', '.join(sorted(table))}")
    return table[lang]


def check_languages(langs: list[str], table: dict[str, str], corpus: str) -> list[str]:
    """``langs`` unchanged when ``table`` (e.g. :data:`NTREX_FILES`) has them all; a ValueError naming the others."""
    unknown = [lang for lang in langs if lang not in table]
    if unknown:
        raise ValueError(f"{corpus} has no language {unknown}; available: {', '.join(sorted(table))}")
    return langs


def ntrex_file(lang: str, root: str | Path | None = None) -> Path:
    """Path of the NTREX file for ISO 639-1 code ``lang`` (``root`` overrides the bundled copy)."""
    base = Path(root) if root else data_dir() / "ntrex"
    return base / _check_lang(lang, NTREX_FILES, "NTREX")


def ntrex_document_ids(root: str | Path | None = None) -> list[str]:
    """Document id of each NTREX line (line-aligned), for document-level splits."""
    base = Path(root) if root else data_dir() / "ntrex"
    return (base / "DOCUMENT_IDS.tsv").read_text(encoding="utf-8").splitlines()


def tatoeba_files(lang: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """(foreign, english) files of the Tatoeba ``lang``-English test set, aligned by line."""
    code = _check_lang(lang, TATOEBA_CODES, "Tatoeba")
    base = Path(root) if root else data_dir() / "tatoeba"
    return base / f"tatoeba.{code}-eng.{code}", base / f"tatoeba.{code}-eng.eng"
