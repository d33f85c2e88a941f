"""Retrieval tasks and the BEIR loader.

A :class:`RetrievalTask` is everything needed to score an embedder on one retrieval problem:
queries, a corpus, graded relevance judgements (qrels), the languages involved and, optionally,
documents each query must not retrieve (its own copy in a pooled multilingual corpus).

:func:`load_beir` reads the BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
``qrels/<split>.tsv``) from a local directory or any fsspec URL. Bad records are skipped and
counted in a :class:`LoadReport` (``on_error="skip"``) or raise a
:class:`~babelforge.errors.DataFormatError` naming the file and line (``on_error="raise"``)::

    >>> task, report = load_beir("data/scifact", split="test")          # doctest: +SKIP
    >>> print(report.summary())                                         # doctest: +SKIP
    data/scifact: 300 queries, 5183 docs, 339 qrels; skipped 0 records
    >>> task.qrels["1"]                                                 # doctest: +SKIP
    {'31715818': 1}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal

import fsspec

from babelforge.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["Setting", "SETTINGS", "MIXED_LANGUAGES", "RetrievalTask", "LoadReport", "load_beir", "stable_sample"]

Setting = Literal["monolingual", "cross-lingual", "multilingual"]
SETTINGS: tuple[str, ...] = ("monolingual", "cross-lingual", "multilingual")

MIXED_LANGUAGES = "mul"  # ISO 639-2 code for "multiple languages", used as a task's query_lang


@dataclass
class RetrievalTask:
    """One retrieval problem: rank ``corpus`` for each query in ``queries``.

    ``qrels[qid][docid]`` is a graded relevance (``>= 1`` relevant, ``0`` judged non-relevant).
    ``query_lang`` is an ISO 639-1 code, or ``"mul"`` when queries mix languages; then
    ``query_langs`` gives each query's language. ``doc_langs`` gives each document's language when
    the corpus mixes languages (needed for the language-bias measure). ``exclude[qid]`` lists
    documents removed from that query's ranking before scoring (e.g. the query's own text in a
    pooled corpus). ``query_prompt`` / ``corpus_prompt`` are the embedder prompt names used to
    encode each side (``None``: no prompt).
    """

    name: str
    setting: Setting
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    query_lang: str
    corpus_langs: tuple[str, ...]
    query_langs: dict[str, str] | None = None
    doc_langs: dict[str, str] | None = None
    exclude: dict[str, set[str]] = field(default_factory=dict)
    query_prompt: str | None = "query"
    corpus_prompt: str | None = "passage"

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"task {self.name}: setting must be one of {SETTINGS}, got {self.setting!r}")
        self.corpus_langs = tuple(self.corpus_langs)
        for qid, judged in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"task {self.name}: qrels name query {qid!r}, which is not among the queries")
            missing = [d for d in judged if d not in self.corpus]
            if missing:
                raise ValueError(f"task {self.name}: qrels of query {qid!r} name documents not in the corpus: "
                                 f"{missing[:3]}")
        for qid, docs in self.exclude.items():
            if qid not in self.queries:
                raise ValueError(f"task {self.name}: exclude names query {qid!r}, which is not among the queries")
            if any(d in self.qrels.get(qid, {}) and self.qrels[qid][d] > 0 for d in docs):
                raise ValueError(f"task {self.name}: query {qid!r} excludes a document judged relevant")
        for what, langs, ids in (("query_langs", self.query_langs, self.queries),
                                 ("doc_langs", self.doc_langs, self.corpus)):
            if langs is not None and len(langs) != len(ids):
                raise ValueError(f"task {self.name}: {what} covers {len(langs)} of {len(ids)} ids")

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    @property
    def query_languages(self) -> list[str]:
        """Distinct query languages, sorted."""
        return sorted(set(self.query_langs.values())) if self.query_langs else [self.query_lang]

    def language_of_query(self, qid: str) -> str:
        return self.query_langs[qid] if self.query_langs else self.query_lang

    def describe(self) -> str:
        langs = ",".join(self.query_languages) + " -> " + ",".join(self.corpus_langs)
        return f"{self.name} [{self.setting}; {langs}]: {len(self.queries)} queries, {len(self.corpus)} docs"

    def with_max_queries(self, max_queries: int | None, seed: int = 0) -> "RetrievalTask":
        """A copy keeping at most ``max_queries`` queries (a seeded, order-independent sample)."""
        if max_queries is None or len(self.queries) <= max_queries:
            return self
        kept = set(stable_sample(self.queries, max_queries, seed))
        return replace(
            self,
            queries={q: t for q, t in self.queries.items() if q in kept},
            qrels={q: r for q, r in self.qrels.items() if q in kept},
            query_langs={q: lang for q, lang in self.query_langs.items() if q in kept} if self.query_langs else None,
            exclude={q: d for q, d in self.exclude.items() if q in kept},
        )


def stable_sample(ids: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """``n`` ids chosen by ranking SHA-256 of ``"{seed}:{id}"``; returned in their input order.

    Unlike ``random.sample`` this depends on nothing but the ids and the seed (not on the Python
    or NumPy version, nor on the order of ``ids``), so held-out sets stay put across machines.
    """
    items = list(ids)
    if n >= len(items):
        return items
    ranked = sorted(items, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    chosen = set(ranked[:n])
    return [i for i in items if i in chosen]


# ---------------------------------------------------------------------- BEIR
@dataclass
class LoadReport:
    """What :func:`load_beir` read and what it skipped (``problems`` holds the first few details)."""

    path: str
    queries: int = 0
    docs: int = 0
    qrels: int = 0
    malformed_lines: int = 0
    empty_queries: int = 0
    empty_docs: int = 0
    duplicate_ids: int = 0
    qrels_unknown_query: int = 0
    qrels_unknown_doc: int = 0
    queries_without_relevant: int = 0
    problems: list[str] = field(default_factory=list)

    MAX_PROBLEMS = 10

    @property
    def skipped(self) -> int:
        return (self.malformed_lines + self.empty_queries + self.empty_docs + self.duplicate_ids
                + self.qrels_unknown_query + self.qrels_unknown_doc + self.queries_without_relevant)

    def note(self, message: str) -> None:
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(message)

    def skip(self, counter: str, message: str, on_error: OnError) -> None:
        """Count a skipped line under ``counter`` and note why, or raise that as a DataFormatError."""
        if on_error == "raise":
            raise DataFormatError(message) from None
        setattr(self, counter, getattr(self, counter) + 1)
        self.note(message)

    def summary(self) -> str:
        counts = {"malformed lines": self.malformed_lines, "empty queries": self.empty_queries,
                  "empty docs": self.empty_docs, "duplicate ids": self.duplicate_ids,
                  "qrels with unknown query": self.qrels_unknown_query,
                  "qrels with unknown doc": self.qrels_unknown_doc,
                  "queries without relevant docs": self.queries_without_relevant}
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        text = (f"{self.path}: {self.queries} queries, {self.docs} docs, {self.qrels} qrels; "
                f"skipped {self.skipped} records" + (f" ({detail})" if detail else ""))
        return "\n  ".join([text, *self.problems])


OnError = Literal["skip", "raise"]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _require_file(path: str, hint: str = "") -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        if not hint and path.endswith(".tsv"):
            folder = posixpath.dirname(fs_path)
            splits = (sorted(posixpath.basename(p).removesuffix(".tsv") for p in fs.ls(folder, detail=False))
                      if fs.isdir(folder) else [])
            hint = f" (available qrels splits: {', '.join(splits) or 'none'})"
        raise DataFormatError(f"{path}: file not found{hint}")


def _open_text(path: str) -> io.TextIOBase:
    return fsspec.open(path, "rt", encoding="utf-8").open()


def _read_jsonl(path: str, report: LoadReport, on_error: OnError) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                if not isinstance(record.get("_id"), (str, int)):
                    raise ValueError("missing field '_id'")
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                report.skip("malformed_lines", f"{path}:{lineno}: malformed record: {err}", on_error)
                continue
            yield lineno, record


def _text_field(record: dict, key: str) -> str:
    value = record.get(key)
    return value.strip() if isinstance(value, str) else ""


_EMPTY_COUNTER = {"query": "empty_queries", "doc": "empty_docs"}


def _read_texts(path: str, kind: Literal["query", "doc"], report: LoadReport, on_error: OnError) -> dict[str, str]:
    texts: dict[str, str] = {}
    for lineno, record in _read_jsonl(path, report, on_error):
        rid = str(record["_id"])
        if kind == "doc":  # BEIR convention (as in sentence-transformers): "title text"
            text = " ".join(p for p in (_text_field(record, "title"), _text_field(record, "text")) if p)
        else:
            text = _text_field(record, "text")
        problem = None
        if rid in texts:
            problem, counter = f"{path}:{lineno}: duplicate _id {rid!r} (first occurrence kept)", "duplicate_ids"
        elif not text:
            problem, counter = f"{path}:{lineno}: {kind} {rid!r} has no text", _EMPTY_COUNTER[kind]
        if problem:
            report.skip(counter, problem, on_error)
            continue
        texts[rid] = text
    return texts


def _read_qrels(path: str, queries: dict[str, str], corpus: dict[str, str], report: LoadReport,
                on_error: OnError) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    unknown: dict[str, list[str]] = {"query": [], "doc": []}
    with _open_text(path) as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # header
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}")
                qid, docid, score = row[0].strip(), row[1].strip(), int(row[2])
            except ValueError as err:
                report.skip("malformed_lines", f"{path}:{lineno}: malformed qrels row: {err}", on_error)
                continue
            missing = "query" if qid not in queries else "doc" if docid not in corpus else None
            if missing:
                bad_id = qid if missing == "query" else docid
                if on_error == "raise":
                    raise DataFormatError(f"{path}:{lineno}: {missing} id {bad_id!r} is not in the "
                                          f"{'queries' if missing == 'query' else 'corpus'} (or was skipped)")
                setattr(report, f"qrels_unknown_{missing}", getattr(report, f"qrels_unknown_{missing}") + 1)
                unknown[missing].append(bad_id)
                continue
            qrels.setdefault(qid, {})[docid] = score
    for kind, ids in unknown.items():
        if ids:
            shown = ", ".join(repr(i) for i in sorted(set(ids))[:5])
            message = f"{path}: {len(ids)} qrels name unknown {kind} ids, e.g. {shown}"
            log.warning(message)
            report.note(message)
    return qrels


def load_beir(path: str, split: str = "test", on_error: OnError = "skip", *, name: str | None = None,
              lang: str = "en", query_prompt: str | None = "query",
              corpus_prompt: str | None = "passage") -> tuple[RetrievalTask, LoadReport]:
    """Load a BEIR dataset (local directory or fsspec URL) as a monolingual task.

    Queries without any relevant document (no qrels, or only score 0) are dropped and counted,
    since no ranking can score on them. With ``on_error="raise"`` the first bad record raises a
    :class:`DataFormatError` naming ``file:line``; with ``"skip"`` it is counted in the report.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    root = str(path)
    report = LoadReport(path=root)
    qrels_path = _join(root, "qrels", f"{split}.tsv")
    layout = " (BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
    _require_file(_join(root, "corpus.jsonl"), layout)
    _require_file(_join(root, "queries.jsonl"), layout)
    _require_file(qrels_path)
    corpus = _read_texts(_join(root, "corpus.jsonl"), "doc", report, on_error)
    queries = _read_texts(_join(root, "queries.jsonl"), "query", report, on_error)
    qrels = _read_qrels(qrels_path, queries, corpus, report, on_error)
    relevant = {q: r for q, r in qrels.items() if any(score > 0 for score in r.values())}
    report.queries_without_relevant = sum(1 for q in queries if q not in relevant)
    queries = {q: t for q, t in queries.items() if q in relevant}
    report.queries, report.docs = len(queries), len(corpus)
    report.qrels = sum(len(r) for r in relevant.values())
    task_name = name or f"beir/{root.rstrip('/').rsplit('/', 1)[-1]}"
    task = RetrievalTask(name=task_name, setting="monolingual", queries=queries, corpus=corpus, qrels=relevant,
                         query_lang=lang, corpus_langs=(lang,), query_prompt=query_prompt,
                         corpus_prompt=corpus_prompt)
    return task, report
