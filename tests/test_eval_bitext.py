"""NTREX / Tatoeba task construction: line i <-> line i, deterministic article-level split."""

from __future__ import annotations

import pytest

from babelforge.errors import DataFormatError
from babelforge.eval.bitext import (ntrex_crosslingual_task, ntrex_monolingual_task, ntrex_multilingual_task,
                                    parse_line_range, read_ntrex, select_ntrex_lines, split_ntrex_lines, tatoeba_task)
from babelforge.resources import ntrex_document_ids


def test_crosslingual_qrels_pair_line_i_with_line_i():
    task = ntrex_crosslingual_task("de", "en", range(100, 160))
    de, en = read_ntrex("de"), read_ntrex("en")
    assert task.name == "ntrex/de-en" and task.setting == "cross-lingual"
    assert len(task.queries) == len(task.corpus) == 60
    for i in range(100, 160):
        assert task.queries[f"de:{i}"] == de[i]
        assert task.qrels[f"de:{i}"] == {f"en:{i}": 1}
        assert task.corpus[f"en:{i}"] == en[i]
    assert (task.query_prompt, task.corpus_prompt) == ("query", "query")


def test_identical_target_sentences_are_all_relevant():
    de = read_ntrex("de")
    dup = next(t for t in de if de.count(t) > 1)
    lines = [i for i, t in enumerate(de) if t == dup]
    task = ntrex_crosslingual_task("en", "de", lines)
    for i in lines:
        assert task.qrels[f"en:{i}"] == {f"de:{j}": 1 for j in lines}


def test_max_queries_samples_queries_but_keeps_the_corpus():
    a = ntrex_crosslingual_task("en", "zh", range(300), max_queries=40, seed=1)
    b = ntrex_crosslingual_task("en", "zh", range(300), max_queries=40, seed=1)
    c = ntrex_crosslingual_task("en", "zh", range(300), max_queries=40, seed=2)
    assert len(a.queries) == 40 and len(a.corpus) == 300
    assert list(a.queries) == list(b.queries) != list(c.queries)


def test_heldout_split_is_deterministic_and_disjoint_by_article():
    split = split_ntrex_lines(0.2, seed=0)
    again = split_ntrex_lines(0.2, seed=0)
    other = split_ntrex_lines(0.2, seed=1)
    docs = ntrex_document_ids()
    assert split == again and split.heldout_lines != other.heldout_lines
    assert sorted(split.train_lines + split.heldout_lines) == list(range(len(docs)))
    train_docs = {docs[i] for i in split.train_lines}
    heldout_docs = {docs[i] for i in split.heldout_lines}
    assert not train_docs & heldout_docs
    assert heldout_docs == set(split.heldout_documents)
    assert 0.2 * len(docs) <= len(split.heldout_lines) < 0.2 * len(docs) + 30  # at most one article over
    assert split_ntrex_lines(0.0).heldout_lines == []


def test_select_lines_combines_range_and_split():
    heldout = set(split_ntrex_lines(0.2, 0).heldout_lines)
    chosen = select_ntrex_lines("0:1000", "heldout")
    assert chosen == sorted(i for i in heldout if i < 1000)
    assert select_ntrex_lines(":10") == list(range(10))
    assert parse_line_range("1990:", 1997) == range(1990, 1997)
    with pytest.raises(ValueError, match="expected START:STOP"):
        parse_line_range("ten", 1997)
    with pytest.raises(ValueError, match="selects no line"):
        parse_line_range("5:5", 1997)


def test_monolingual_sentence_to_passage_of_its_article():
    lines = select_ntrex_lines(split="heldout")
    docs = ntrex_document_ids()
    whole = ntrex_monolingual_task("ru", lines)
    assert len(whole.corpus) == len({docs[i] for i in lines})
    ru = read_ntrex("ru")
    for i in lines:
        relevant = whole.qrels[f"ru:{i}"]
        assert f"ru:{docs[i]}" in relevant and all(ru[i] in whole.corpus[pid] for pid in relevant)
    chunked = ntrex_monolingual_task("ru", lines, passage_sentences=4)
    assert chunked.name == "ntrex/ru-p4" and len(chunked.corpus) > len(whole.corpus)
    for i in lines:
        relevant = chunked.qrels[f"ru:{i}"]
        assert any(pid.startswith(f"ru:{docs[i]}#") for pid in relevant)
        assert all(ru[i] in chunked.corpus[pid] for pid in relevant)
    # A sentence that occurs twice ("The situation is very bad.") makes both passages relevant.
    selected_texts = [ru[j] for j in lines]
    has_duplicate = any(selected_texts.count(text) > 1 for text in selected_texts)
    assert any(len(relevant) > 1 for relevant in chunked.qrels.values()) == has_duplicate
    assert (whole.query_prompt, whole.corpus_prompt) == ("query", "passage")


def test_multilingual_pool_relevance_exclusion_and_languages():
    task = ntrex_multilingual_task(["en", "de", "zh"], range(50), max_queries=10)
    assert task.setting == "multilingual" and len(task.corpus) == 150 and len(task.queries) == 30
    for qid in task.queries:
        lang, line = qid.split(":")
        others = {"en", "de", "zh"} - {lang}
        assert task.qrels[qid] == {f"{o}:{line}": 1 for o in others}
        assert task.exclude[qid] == {qid}
        assert task.query_langs[qid] == lang
    assert task.doc_langs["zh:3"] == "zh"
    assert {q.split(":")[1] for q in task.queries if q.startswith("en:")} == \
           {q.split(":")[1] for q in task.queries if q.startswith("zh:")}


def test_tatoeba_pairs_foreign_with_english():
    task = tatoeba_task("sw")
    reverse = tatoeba_task("sw", to_english=False, max_queries=5)
    assert task.name == "tatoeba/sw-en" and len(task.queries) == 390
    assert task.qrels["sw:7"] == {"en:7": 1}
    assert reverse.name == "tatoeba/en-sw" and len(reverse.queries) == 5 and len(reverse.corpus) == 390


def test_misaligned_or_empty_files_name_file_and_line(tmp_path):
    root = tmp_path / "ntrex"
    root.mkdir()
    (root / "DOCUMENT_IDS.tsv").write_text("a\na\nb\n")
    (root / "ntrex.eng-US.txt").write_text("one\ntwo\nthree\n")
    (root / "ntrex.deu.txt").write_text("eins\n\ndrei\n")
    (root / "ntrex.fra.txt").write_text("un\ndeux\n")
    with pytest.raises(DataFormatError, match=r"ntrex\.deu\.txt:2: empty line"):
        ntrex_crosslingual_task("en", "de", root=root)
    with pytest.raises(DataFormatError, match=r"ntrex\.fra\.txt: 2 lines, but its aligned files have 3"):
        ntrex_crosslingual_task("en", "fr", root=root)
