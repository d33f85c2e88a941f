"""Text normalisation and the overlong-text rules of ingest (pure functions, no Ray).

``normalize_text`` applies Unicode normalisation (NFC or NFKC), turns ``\\r\\n``/``\\r`` into ``\\n``,
removes control characters other than tab and newline and the byte-order mark, and strips the ends.
Zero-width joiners are kept: they are meaningful in Indic, Arabic-script and emoji text.

``split_text`` cuts a long text into chunks of at most ``max_chars`` characters, preferring paragraph
breaks, then sentence ends (``.!?…`` followed by a space; ``。！？`` anywhere), then spaces, and only
then a hard cut; neighbouring pieces are packed greedily so chunks are as long as allowed.
``truncate_text`` keeps the first ``max_chars`` characters, ending at a space when one is near.

``canonical_text`` is the form in which decontamination compares texts with evaluation texts
(:mod:`babelforge.data.decontaminate`): ``normalize_text``, then casefolding and every whitespace run
collapsed to one space.

    >>> normalize_text("\\ufeff  Cafe\\u0301\\r\\nbar\\x00 ", "NFC")
    'Café\\nbar'
    >>> split_text("One two. Three four five. Six.", max_chars=12)
    ['One two.', 'Three four', 'five. Six.']
    >>> truncate_text("One two three", max_chars=9)
    'One two'
    >>> canonical_text(" The\\u00a0CAFE\\u0301\\r\\n  bar ", "NFC")
    'the café bar'
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

__all__ = ["normalize_text", "canonical_text", "split_text", "truncate_text"]

_NEWLINES = re.compile(r"\r\n?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_WHITESPACE = re.compile(r"\s+")

# Boundaries from coarse to fine; each match ends a piece (the separator stays with the piece before it).
_BOUNDARIES = (
    re.compile(r"\n[^\S\n]*\n\s*"),                  # paragraph break
    re.compile(r"(?<=[.!?…])\s+|(?<=[。！？])\s*"),    # sentence end
    re.compile(r"\s+"),                              # word
)


def normalize_text(text: str, form: Literal["NFC", "NFKC"] = "NFC") -> str:
    """Unicode-normalised ``text`` with unified newlines, no control characters and no outer whitespace."""
    text = unicodedata.normalize(form, text)
    return _CONTROL.sub("", _NEWLINES.sub("\n", text)).strip()


def canonical_text(text: str, form: Literal["NFC", "NFKC"] = "NFC") -> str:
    """``normalize_text`` casefolded, with each whitespace run as one space (the ends are already stripped)."""
    return _WHITESPACE.sub(" ", normalize_text(text, form).casefold())


def _fits(text: str, max_chars: int) -> bool:
    return len(text.rstrip()) <= max_chars


def _split(text: str, max_chars: int, level: int) -> list[str]:
    if _fits(text, max_chars):
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    ends = [m.end() for m in _BOUNDARIES[level].finditer(text) if 0 < m.end() < len(text)]
    chunks: list[str] = []
    current = ""
    for start, end in zip([0, *ends], [*ends, len(text)]):
        unit = text[start:end]
        if _fits(current + unit, max_chars):
            current += unit
            continue
        if current:
            chunks.append(current)
        if _fits(unit, max_chars):
            current = unit
        else:  # too long for one chunk: cut it at finer boundaries; its tail may share a chunk with what follows
            *full, current = _split(unit, max_chars, level + 1)
            chunks.extend(full)
    chunks.append(current)
    return chunks


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut at the coarsest boundaries that give chunks of at most ``max_chars`` characters."""
    return [chunk.strip() for chunk in _split(text, max_chars, 0) if chunk.strip()]


def truncate_text(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of ``text``, cut at the last space in the second half if any."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if not text[max_chars].isspace():
        space = max(head.rfind(" "), head.rfind("\n"))
        if space >= max_chars // 2:
            head = head[:space]
    return head.rstrip()
