"""BEIR loading: bad records are skipped and counted, or raise naming file:line / the id."""

from __future__ import annotations

import json

import pytest

from babelforge.errors import DataFormatError
from babelforge.eval.datasets import RetrievalTask, load_beir, stable_sample


def _write_beir(root, corpus_lines, query_lines, qrels_rows, split="test"):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    (root / "queries.jsonl").write_text("\n".join(query_lines) + "\n", encoding="utf-8")
    (root / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels_rows), encoding="utf-8")
    return root


@pytest.fixture
def messy_beir(tmp_path):
    doc = lambda i, title, text: json.dumps({"_id": i, "title": title, "text": text})  # noqa: E731
    corpus = [doc("d1", "Eiffel", "The tower is 330 m tall."), doc("d2", "", "Paris is in France."),
              '{"_id": "d3", "title": "broken", "text": ',            # line 3: malformed JSON
              doc("d4", "", "  "),                                   # line 4: empty title and text
              doc("d5", "Rome", "")]                                 # title only is fine
    queries = [json.dumps({"_id": "q1", "text": "how tall is the eiffel tower"}),
               json.dumps({"_id": "q2", "text": ""}),                # empty query
               json.dumps({"_id": "q3", "text": "where is paris"}),
               json.dumps({"_id": "q4", "text": "a query without judgements"})]
    qrels = [("q1", "d1", 2), ("q1", "d5", 0), ("q3", "d2", 1),
             ("q3", "d99", 1),                                       # unknown doc
             ("q42", "d1", 1),                                       # unknown query
             ("q2", "d1", 1)]                                        # query skipped as empty
    return _write_beir(tmp_path / "messy", corpus, queries, qrels)


def test_skip_mode_counts_every_problem(messy_beir, caplog):
    with caplog.at_level("WARNING"):
        task, report = load_beir(str(messy_beir), split="test")
    assert task.corpus == {"d1": "Eiffel The tower is 330 m tall.", "d2": "Paris is in France.", "d5": "Rome"}
    assert task.queries == {"q1": "how tall is the eiffel tower", "q3": "where is paris"}
    assert task.qrels == {"q1": {"d1": 2, "d5": 0}, "q3": {"d2": 1}}
    assert (report.malformed_lines, report.empty_docs, report.empty_queries) == (1, 1, 1)
    assert (report.qrels_unknown_doc, report.qrels_unknown_query) == (1, 2)  # q42, and q2 (skipped as empty)
    assert report.queries_without_relevant == 1  # q4
    assert (report.queries, report.docs, report.qrels) == (2, 3, 3)
    assert report.skipped == 7
    summary = report.summary()
    assert "corpus.jsonl:3: malformed record" in summary and "'d99'" in summary and "'q42'" in summary
    assert "'d99'" in caplog.text and "'q42'" in caplog.text
    assert task.setting == "monolingual" and task.name == "beir/messy"


def test_strict_mode_names_file_and_line(messy_beir):
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: malformed record"):
        load_beir(str(messy_beir), on_error="raise")


def test_strict_mode_names_the_unknown_id(tmp_path):
    root = _write_beir(tmp_path / "b", [json.dumps({"_id": "d1", "text": "x"})],
                       [json.dumps({"_id": "q1", "text": "y"})], [("q1", "d1", 1), ("q1", "missing-doc", 1)])
    with pytest.raises(DataFormatError, match=r"test\.tsv:3: doc id 'missing-doc' is not in the corpus"):
        load_beir(str(root), on_error="raise")


def test_missing_files_name_the_path_and_available_splits(tmp_path, messy_beir):
    with pytest.raises(DataFormatError, match=r"nowhere/corpus\.jsonl: file not found"):
        load_beir(str(tmp_path / "nowhere"))
    with pytest.raises(DataFormatError, match=r"qrels/dev\.tsv: file not found \(available qrels splits: test\)"):
        load_beir(str(messy_beir), split="dev")


def test_loads_through_fsspec_urls(messy_beir):
    task, report = load_beir(f"file://{messy_beir}")
    assert len(task.queries) == 2 and report.malformed_lines == 1


def test_task_validation_and_query_sampling():
    with pytest.raises(ValueError, match="not in the corpus"):
        RetrievalTask(name="t", setting="monolingual", queries={"q": "x"}, corpus={"d": "y"},
                      qrels={"q": {"e": 1}}, query_lang="en", corpus_langs=("en",))
    queries = {f"q{i}": f"text {i}" for i in range(50)}
    task = RetrievalTask(name="t", setting="monolingual", queries=queries, corpus={"d": "y"},
                         qrels={q: {"d": 1} for q in queries}, query_lang="en", corpus_langs=("en",))
    small = task.with_max_queries(10, seed=3)
    assert len(small.queries) == 10 and set(small.qrels) == set(small.queries)
    assert small.queries == task.with_max_queries(10, seed=3).queries
    assert stable_sample(list(reversed(queries)), 10, seed=3) == list(reversed(list(small.queries)))
