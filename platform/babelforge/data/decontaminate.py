"""Evaluation-set decontamination: keeping evaluation texts out of the ingested corpus (pure compute, no Ray).

Evaluation queries and documents come from held-out text: the held-out articles of the NTREX split
(:func:`babelforge.eval.bitext.split_ntrex_lines`) and whatever the eval tasks use, which the pipeline
exports to plain-text files. Later stages draw training data from the ingested corpus, so a record
whose text is an evaluation text must not be kept. :func:`build_eval_index` collects the texts named
by ``IngestConfig.decontaminate`` once, in the driver, into an :class:`EvalTextIndex`: the 64-bit
BLAKE2b hash of each text's canonical form (:func:`~babelforge.data.normalize.canonical_text`: the
ingest normalisation, casefolded, whitespace runs collapsed) mapped to where the text comes from.
Validation (:mod:`babelforge.data.validate`) looks up every record's whole text, and every chunk of
a split or truncated text, and quarantines matches as ``eval_contamination``.

This is *exact-text* decontamination: a record is caught when its text equals an evaluation text up
to Unicode normalisation, case and whitespace. Paraphrases, a passage that merely contains an
evaluation sentence, or partial overlap are not caught; n-gram overlap decontamination (dropping
records that share a long word n-gram with an evaluation text) would be the extension. With 64-bit
hashes, a false match among ~10^5 evaluation texts has a probability of ~10^-14 per record.

    >>> index = EvalTextIndex.from_texts([("The  cat sat.", "eval.txt:1"), ("", "eval.txt:2")], "NFC")
    >>> len(index), index.match("the CAT\\nsat."), index.match("The cat sat")
    (1, 'eval.txt:1', None)
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import pyarrow.fs as pafs

from babelforge.data.config import DecontaminateConfig
from babelforge.data.normalize import canonical_text
from babelforge.data.readers import open_filesystem
from babelforge.errors import ConfigError, DataFormatError
from babelforge.resources import NTREX_FILES

__all__ = ["EvalTextIndex", "build_eval_index", "ntrex_heldout_texts", "text_file_texts"]

NormalForm = Literal["NFC", "NFKC"]
_TEXT_FILES_KEY = "decontaminate.text_files"


def _hash(canonical: str) -> int:
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class EvalTextIndex:
    """Canonical-text hashes of the evaluation texts -> the source of the first text with that hash."""

    form: NormalForm              # the ingest normalisation the canonical form starts with
    sources: dict[int, str]       # e.g. "held-out NTREX line ntrex.deu.txt:124", "eval_texts.txt:7"

    @classmethod
    def from_texts(cls, texts: Iterable[tuple[str, str]], form: NormalForm) -> "EvalTextIndex":
        """Index ``(text, source)`` pairs; texts that are empty in canonical form are skipped."""
        sources: dict[int, str] = {}
        for text, source in texts:
            canonical = canonical_text(text, form)
            if canonical:
                sources.setdefault(_hash(canonical), source)
        return cls(form, sources)

    def __len__(self) -> int:
        return len(self.sources)

    def match(self, text: str) -> str | None:
        """The source of the evaluation text equal to ``text`` in canonical form, or None."""
        return self.sources.get(_hash(canonical_text(text, self.form)))

    def fingerprint(self) -> dict[str, Any]:
        """Size and digest of the index, so that a resumed run notices changed evaluation texts."""
        digest = hashlib.sha256()
        for key, source in sorted(self.sources.items()):
            digest.update(f"{key:016x} {source}\n".encode("utf-8"))
        return {"texts": len(self.sources), "sha256": digest.hexdigest()[:16]}


def ntrex_heldout_texts(holdout_fraction: float | None = None, seed: int | None = None) -> Iterator[tuple[str, str]]:
    """``(text, source)`` of the held-out lines of every NTREX language file (None: the eval split's defaults)."""
    # babelforge.eval imports the model stack (torch): only the driver, which builds the index, pays for it
    from babelforge.eval.bitext import DEFAULT_HOLDOUT_FRACTION, DEFAULT_SPLIT_SEED, read_ntrex, split_ntrex_lines

    split = split_ntrex_lines(DEFAULT_HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction,
                              DEFAULT_SPLIT_SEED if seed is None else seed)
    for lang, file_name in NTREX_FILES.items():
        texts = read_ntrex(lang)
        for i in split.heldout_lines:
            yield texts[i], f"held-out NTREX line {file_name}:{i + 1}"


def text_file_texts(uris: list[str]) -> Iterator[tuple[str, str]]:
    """``(line, "<uri>:<line number>")`` of each file: UTF-8 text, local or a URI, compressed by extension.

    A missing file raises :class:`ConfigError` naming ``decontaminate.text_files[i]``; bytes that are
    not UTF-8 raise :class:`DataFormatError` naming the file and line. A text that contains newlines
    can be written with spaces instead: the match collapses whitespace.
    """
    for i, uri in enumerate(uris):
        fs, path = open_filesystem(uri)
        kind = fs.get_file_info(path).type
        if kind != pafs.FileType.File:
            problem = "does not exist" if kind == pafs.FileType.NotFound else "is not a file"
            raise ConfigError(f"{_TEXT_FILES_KEY}[{i}]: {uri!r} {problem}")
        with fs.open_input_stream(path, compression="detect") as stream:
            data = stream.read()
        for line_no, line in enumerate(data.split(b"\n"), start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{uri}:{line_no}: not valid UTF-8 (byte {err.start}: {err.reason}); "
                                      f"{_TEXT_FILES_KEY}[{i}] must be UTF-8 text, one evaluation text per line"
                                      ) from None
            yield text, f"{uri}:{line_no}"


def build_eval_index(cfg: DecontaminateConfig, form: NormalForm) -> EvalTextIndex | None:
    """The evaluation texts ``cfg`` names, indexed in canonical form; None when decontamination is off."""
    if not cfg.enabled:
        return None
    ntrex = ntrex_heldout_texts(cfg.holdout_fraction, cfg.seed) if cfg.ntrex_heldout else iter(())
    return EvalTextIndex.from_texts(itertools.chain(ntrex, text_file_texts(cfg.text_files)), form)
