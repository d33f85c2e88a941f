"""Retrieval tasks built from the bundled parallel corpora (NTREX-128 and Tatoeba).

Line ``i`` of every NTREX file is the same news sentence, and ``DOCUMENT_IDS.tsv`` names the
article each line belongs to. The task constructions are:

- **cross-lingual X->Y** (:func:`ntrex_crosslingual_task`): query = line ``i`` in X; corpus = the
  selected lines in Y; relevant = line ``i`` in Y. NTREX repeats a few short sentences ("The
  situation is very bad."), so every Y line with exactly the same text counts as relevant too.
- **monolingual X** (:func:`ntrex_monolingual_task`): query = line ``i`` in X; corpus = passages
  in X made of the sentences of each NTREX article (the whole article, or consecutive windows of
  ``passage_sentences`` sentences); relevant = the passage that contains line ``i``. This is
  "find the article section a sentence comes from": it tests whether a passage embedding keeps
  the content of each of its sentences, against topically close distractors (the other passages
  of the same article) rather than by translation equivalence.
- **multilingual pool** (:func:`ntrex_multilingual_task`): ONE corpus holding the selected lines
  of every language; query = line ``i`` in X; relevant = line ``i`` in every other language; the
  query's own line in X (and identical copies) are excluded from its ranking. A model biased
  towards the query's language ranks other X sentences above the translations, which the
  ``same_lang@10`` measure of :mod:`babelforge.eval.metrics` reports (ideal 0).
- **Tatoeba** (:func:`tatoeba_task`): foreign sentence -> its English translation (or reverse).

Sentence-to-sentence tasks encode both sides with the ``"query"`` prompt (the e5 convention for
symmetric tasks such as bitext mining); sentence-to-passage uses ``"query"`` / ``"passage"``.

Held-out evaluation uses :func:`split_ntrex_lines`, a deterministic split by *article*, so a
model trained on the ``train`` lines never saw any sentence of a held-out article::

    >>> split = split_ntrex_lines(holdout_fraction=0.2, seed=0)
    >>> task = ntrex_crosslingual_task("de", "en", split.heldout_lines, max_queries=100)
    >>> len(task.queries), len(task.corpus) == len(split.heldout_lines)
    (100, True)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Literal, Sequence

from babelforge.errors import DataFormatError
from babelforge.eval.datasets import MIXED_LANGUAGES, RetrievalTask, stable_sample
from babelforge.resources import ntrex_document_ids, ntrex_file, tatoeba_files

__all__ = ["NtrexSplit", "NtrexSplitName", "DEFAULT_HOLDOUT_FRACTION", "DEFAULT_SPLIT_SEED", "split_ntrex_lines",
           "parse_line_range", "select_ntrex_lines", "read_ntrex", "ntrex_crosslingual_task",
           "ntrex_monolingual_task", "ntrex_multilingual_task", "tatoeba_task"]

DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0

NtrexSplitName = Literal["all", "train", "heldout"]
Root = str | Path | None


@dataclass(frozen=True)
class NtrexSplit:
    """NTREX line indices split by article: no article has lines on both sides."""

    train_lines: list[int]
    heldout_lines: list[int]
    heldout_documents: list[str]


def split_ntrex_lines(holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = DEFAULT_SPLIT_SEED,
                      root: Root = None) -> NtrexSplit:
    """Hold out whole articles until at least ``holdout_fraction`` of the lines are held out.

    Articles are taken in the order of SHA-256 of ``"{seed}:{document_id}"``, so the split depends
    only on the seed and the document ids (stable across machines and library versions).
    """
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"holdout_fraction must be within [0, 1], got {holdout_fraction}")
    doc_of_line = ntrex_document_ids(root)
    lines_of_doc: dict[str, list[int]] = {}
    for i, doc in enumerate(doc_of_line):
        lines_of_doc.setdefault(doc, []).append(i)
    order = sorted(lines_of_doc, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    target = holdout_fraction * len(doc_of_line)
    heldout_docs: list[str] = []
    held = 0
    for doc in order:
        if held >= target:
            break
        heldout_docs.append(doc)
        held += len(lines_of_doc[doc])
    heldout = sorted(i for d in heldout_docs for i in lines_of_doc[d])
    heldout_set = set(heldout)
    return NtrexSplit(train_lines=[i for i in range(len(doc_of_line)) if i not in heldout_set],
                      heldout_lines=heldout, heldout_documents=sorted(heldout_docs))


_RANGE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


def parse_line_range(spec: str, n_lines: int) -> range:
    """``"start:stop"`` (either side may be empty, like a Python slice without step) -> ``range``."""
    match = _RANGE.match(spec)
    if not match:
        raise ValueError(f"lines {spec!r}: expected START:STOP, e.g. '0:1000' or ':500'")
    start = int(match.group(1)) if match.group(1) else 0
    stop = min(int(match.group(2)), n_lines) if match.group(2) else n_lines
    if start >= stop:
        raise ValueError(f"lines {spec!r}: selects no line of {n_lines}")
    return range(start, stop)


def select_ntrex_lines(lines: str | None = None, split: NtrexSplitName = "all",
                       holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = DEFAULT_SPLIT_SEED,
                       root: Root = None) -> list[int]:
    """NTREX line indices inside the ``lines`` range and in ``split`` (sorted)."""
    n_lines = len(ntrex_document_ids(root))
    chosen = parse_line_range(lines, n_lines) if lines else range(n_lines)
    if split == "all":
        return list(chosen)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    parts = split_ntrex_lines(holdout_fraction, seed, root)
    allowed = set(parts.heldout_lines if split == "heldout" else parts.train_lines)
    selected = [i for i in chosen if i in allowed]
    if not selected:
        raise ValueError(f"lines {lines!r} and split {split!r} have no line in common")
    return selected


def _read_lines(path: Path, expected: int | None = None) -> list[str]:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if expected is not None and len(lines) != expected:
        raise DataFormatError(f"{path}: {len(lines)} lines, but its aligned files have {expected}")
    empty = next((n for n, text in enumerate(lines, start=1) if not text.strip()), None)
    if empty is not None:
        raise DataFormatError(f"{path}:{empty}: empty line in a line-aligned corpus")
    return [text.strip() for text in lines]


def read_ntrex(lang: str, root: Root = None) -> list[str]:
    """The NTREX sentences of ``lang`` (checked against the line count of DOCUMENT_IDS.tsv)."""
    return _read_lines(ntrex_file(lang, root), expected=len(ntrex_document_ids(root)))


def _sentence_id(lang: str, line: int) -> str:
    return f"{lang}:{line}"


def _lines_by_text(texts: list[str], lines: Sequence[int]) -> dict[str, list[int]]:
    """Text -> the selected lines carrying exactly that text (duplicates share relevance)."""
    out: dict[str, list[int]] = {}
    for i in lines:
        out.setdefault(texts[i], []).append(i)
    return out


def _query_lines(lines: Sequence[int], max_queries: int | None, seed: int) -> list[int]:
    if max_queries is None:
        return list(lines)
    return [int(i) for i in stable_sample([str(i) for i in lines], max_queries, seed)]


def _all_lines(lines: Sequence[int] | None, root: Root) -> list[int]:
    n_lines = len(ntrex_document_ids(root))
    chosen = list(range(n_lines)) if lines is None else sorted(set(lines))
    if not chosen:
        raise ValueError("no NTREX line selected")
    if chosen[0] < 0 or chosen[-1] >= n_lines:
        raise ValueError(f"NTREX line indices must be within 0..{n_lines - 1}")
    return chosen


def _sentence_task(name: str, query_lang: str, query_texts: list[str], doc_lang: str, doc_texts: list[str],
                   corpus_lines: Sequence[int], query_lines: Sequence[int], query_prompt: str | None,
                   corpus_prompt: str | None) -> RetrievalTask:
    same_text = _lines_by_text(doc_texts, corpus_lines)
    return RetrievalTask(
        name=name, setting="cross-lingual", query_lang=query_lang, corpus_langs=(doc_lang,),
        queries={_sentence_id(query_lang, i): query_texts[i] for i in query_lines},
        corpus={_sentence_id(doc_lang, i): doc_texts[i] for i in corpus_lines},
        qrels={_sentence_id(query_lang, i): {_sentence_id(doc_lang, j): 1 for j in same_text[doc_texts[i]]}
               for i in query_lines},
        query_prompt=query_prompt, corpus_prompt=corpus_prompt)


def ntrex_crosslingual_task(query_lang: str, doc_lang: str, lines: Sequence[int] | None = None, *,
                            max_queries: int | None = None, seed: int = 0, root: Root = None,
                            query_prompt: str | None = "query", corpus_prompt: str | None = "query") -> RetrievalTask:
    """Sentence in ``query_lang`` -> its translation among the ``lines`` of ``doc_lang``."""
    if query_lang == doc_lang:
        raise ValueError(f"a cross-lingual task needs two languages, got {query_lang}-{doc_lang}")
    selected = _all_lines(lines, root)
    return _sentence_task(f"ntrex/{query_lang}-{doc_lang}", query_lang, read_ntrex(query_lang, root), doc_lang,
                          read_ntrex(doc_lang, root), selected, _query_lines(selected, max_queries, seed),
                          query_prompt, corpus_prompt)


def tatoeba_task(lang: str, *, to_english: bool = True, max_queries: int | None = None, seed: int = 0,
                 root: Root = None, query_prompt: str | None = "query",
                 corpus_prompt: str | None = "query") -> RetrievalTask:
    """Tatoeba ``lang``-English bitext retrieval: foreign -> English (``to_english``) or reverse."""
    foreign_path, english_path = tatoeba_files(lang, root)
    foreign = _read_lines(foreign_path)
    english = _read_lines(english_path, expected=len(foreign))
    lines = list(range(len(foreign)))
    query_lang, query_texts, doc_lang, doc_texts = ((lang, foreign, "en", english) if to_english
                                                    else ("en", english, lang, foreign))
    return _sentence_task(f"tatoeba/{query_lang}-{doc_lang}", query_lang, query_texts, doc_lang, doc_texts, lines,
                          _query_lines(lines, max_queries, seed), query_prompt, corpus_prompt)


def ntrex_monolingual_task(lang: str, lines: Sequence[int] | None = None, *, passage_sentences: int | None = None,
                           max_queries: int | None = None, seed: int = 0, root: Root = None,
                           query_prompt: str | None = "query", corpus_prompt: str | None = "passage") -> RetrievalTask:
    """Sentence in ``lang`` -> the passage of its own article (in ``lang``) that contains it.

    Passages are built from the selected lines only: each article's selected sentences, joined
    by spaces, whole (``passage_sentences=None``) or in consecutive windows of that many.
    """
    if passage_sentences is not None and passage_sentences < 1:
        raise ValueError(f"passage_sentences must be at least 1, got {passage_sentences}")
    selected = _all_lines(lines, root)
    texts = read_ntrex(lang, root)
    doc_of_line = ntrex_document_ids(root)
    passage_of_line: dict[int, str] = {}
    corpus: dict[str, str] = {}
    for doc, group in groupby(selected, key=doc_of_line.__getitem__):
        doc_lines = list(group)
        size = passage_sentences or len(doc_lines)
        for k, start in enumerate(range(0, len(doc_lines), size)):
            window = doc_lines[start:start + size]
            pid = f"{lang}:{doc}" if passage_sentences is None else f"{lang}:{doc}#{k}"
            corpus[pid] = " ".join(texts[i] for i in window)
            passage_of_line.update((i, pid) for i in window)
    same_text = _lines_by_text(texts, selected)
    query_lines = _query_lines(selected, max_queries, seed)
    suffix = "" if passage_sentences is None else f"-p{passage_sentences}"
    return RetrievalTask(
        name=f"ntrex/{lang}{suffix}", setting="monolingual", query_lang=lang, corpus_langs=(lang,),
        queries={_sentence_id(lang, i): texts[i] for i in query_lines},
        corpus=corpus,
        qrels={_sentence_id(lang, i): {passage_of_line[j]: 1 for j in same_text[texts[i]]} for i in query_lines},
        query_prompt=query_prompt, corpus_prompt=corpus_prompt)


def ntrex_multilingual_task(langs: Sequence[str], lines: Sequence[int] | None = None, *,
                            query_langs: Sequence[str] | None = None, max_queries: int | None = None, seed: int = 0,
                            root: Root = None, query_prompt: str | None = "query",
                            corpus_prompt: str | None = "query") -> RetrievalTask:
    """One corpus of all ``langs``; sentence i in X -> sentence i in every other language.

    Queries come from each of ``query_langs`` (default: all ``langs``) for the same sampled
    lines (``max_queries`` lines per language), so every language asks the same questions.
    """
    pool = list(dict.fromkeys(langs))
    if len(pool) < 2:
        raise ValueError(f"a multilingual pool needs at least two languages, got {list(langs)}")
    asking = list(dict.fromkeys(query_langs or pool))
    outside = [lang for lang in asking if lang not in pool]
    if outside:
        raise ValueError(f"query languages {outside} are not in the pool {pool}")
    selected = _all_lines(lines, root)
    texts = {lang: read_ntrex(lang, root) for lang in pool}
    same_text = {lang: _lines_by_text(texts[lang], selected) for lang in pool}
    corpus = {_sentence_id(lang, i): texts[lang][i] for lang in pool for i in selected}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    exclude: dict[str, set[str]] = {}
    for lang in asking:
        for i in _query_lines(selected, max_queries, seed):
            qid = _sentence_id(lang, i)
            queries[qid] = texts[lang][i]
            qrels[qid] = {_sentence_id(other, j): 1 for other in pool if other != lang
                          for j in same_text[other][texts[other][i]]}
            exclude[qid] = {_sentence_id(lang, j) for j in same_text[lang][texts[lang][i]]}
    return RetrievalTask(
        name=f"ntrex/pool-{'-'.join(pool)}", setting="multilingual", query_lang=MIXED_LANGUAGES,
        corpus_langs=tuple(pool), queries=queries, corpus=corpus, qrels=qrels, exclude=exclude,
        query_langs={qid: qid.split(":", 1)[0] for qid in queries},
        doc_langs={did: did.split(":", 1)[0] for did in corpus},
        query_prompt=query_prompt, corpus_prompt=corpus_prompt)
