"""Evaluation reports: the result data model, JSON and markdown output, before/after comparison.

An :class:`EvalReport` holds, per task, the mean of every metric at every evaluated embedding
dimension. Aggregates (mean nDCG@10 per setting, the multilingual language bias) are derived
from the task results, so they can never disagree with them. Markdown tables show scores x100::

    >>> write_report(report, "outputs/eval")                 # doctest: +SKIP
    {'json': PosixPath('outputs/eval/report.json'), 'markdown': PosixPath('outputs/eval/report.md')}
    >>> before = load_report("outputs/eval-base/report.json")  # doctest: +SKIP
    >>> print(compare_reports(before, report))               # doctest: +SKIP
    | task | before | after | delta |
    ...
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from babelforge.eval.datasets import SETTINGS
from babelforge.eval.metrics import MAIN_METRIC

__all__ = ["TaskResult", "EvalReport", "BIAS_METRIC", "write_report", "load_report", "report_markdown",
           "compare_reports", "compare_by_dimension"]

BIAS_METRIC = "same_lang@10"

_SHORT_NAMES = {"ndcg": "nDCG", "recall": "R", "mrr": "MRR", "same_lang": "same-lang"}


@dataclass
class TaskResult:
    """Scores of one task: ``metrics[dim][name]`` are means over queries.

    ``by_query_lang[dim][lang]`` is the main metric per query language (tasks whose queries mix
    languages only).
    """

    name: str
    setting: str
    query_langs: list[str]
    corpus_langs: list[str]
    n_queries: int
    n_docs: int
    metrics: dict[int, dict[str, float]]
    by_query_lang: dict[int, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskResult":
        data = dict(data)
        data["metrics"] = {int(d): dict(v) for d, v in data["metrics"].items()}
        data["by_query_lang"] = {int(d): dict(v) for d, v in data.get("by_query_lang", {}).items()}
        return cls(**data)


@dataclass
class EvalReport:
    """All task results of one model, with the settings they were computed under."""

    model: str
    dims: list[int]
    metrics: list[str]
    tasks: list[TaskResult]
    timing: dict[str, float] = field(default_factory=dict)
    created: str = ""

    def task(self, name: str) -> TaskResult:
        for result in self.tasks:
            if result.name == name:
                return result
        raise KeyError(f"no task {name!r} in the report; tasks: {[t.name for t in self.tasks]}")

    def aggregates(self, metric: str = MAIN_METRIC) -> dict[str, dict[int, float]]:
        """``setting -> dim -> mean of metric`` over the tasks of that setting (settings present only)."""
        out: dict[str, dict[int, float]] = {}
        for setting in SETTINGS:
            chosen = [t for t in self.tasks if t.setting == setting]
            if chosen:
                out[setting] = {d: sum(t.metrics[d][metric] for t in chosen) / len(chosen) for d in self.dims}
        return out

    def language_bias(self) -> dict[int, float]:
        """``dim -> mean same_lang@10`` over the tasks that measure it (ideal 0); empty if none."""
        chosen = [t for t in self.tasks if BIAS_METRIC in t.metrics.get(self.dims[0], {})] if self.dims else []
        if not chosen:
            return {}
        return {d: sum(t.metrics[d][BIAS_METRIC] for t in chosen) / len(chosen) for d in self.dims}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aggregates"] = {MAIN_METRIC: self.aggregates(), BIAS_METRIC: self.language_bias()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalReport":
        return cls(model=data["model"], dims=[int(d) for d in data["dims"]], metrics=list(data["metrics"]),
                   tasks=[TaskResult.from_dict(t) for t in data["tasks"]], timing=dict(data.get("timing", {})),
                   created=data.get("created", ""))


# ---------------------------------------------------------------------- files
def write_report(report: EvalReport, output_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` into ``output_dir`` (created if needed)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(report_markdown(report), encoding="utf-8")
    return paths


def load_report(path: str | Path) -> EvalReport:
    """Read a ``report.json`` written by :func:`write_report` (a directory holding one also works)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation report here")
    return EvalReport.from_dict(json.loads(path.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------- markdown
def _label(metric: str) -> str:
    kind, _, k = metric.partition("@")
    return f"{_SHORT_NAMES.get(kind, kind)}@{k}" if k else metric


def _score(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _langs(result: TaskResult) -> str:
    return f"{','.join(result.query_langs)}→{','.join(result.corpus_langs)}"


def _timing_line(report: EvalReport) -> str:
    timing = report.timing
    parts = [report.created] if report.created else []
    if "texts_encoded" in timing:
        parts.append(f"{int(timing['texts_encoded'])} unique texts encoded in {timing.get('encode_s', 0.0):.1f} s")
    if "score_s" in timing:
        parts.append(f"search and metrics {timing['score_s']:.1f} s")
    if "total_s" in timing:
        parts.append(f"total {timing['total_s']:.1f} s")
    return "; ".join(parts) + "."


def report_markdown(report: EvalReport) -> str:
    """A readable summary: per-setting means, per-task metrics, the Matryoshka sweep, bias."""
    full = report.dims[0]
    dims_header = [str(d) for d in report.dims]
    lines = [f"# Retrieval evaluation of `{report.model}`", ""]
    if report.timing or report.created:
        lines += [_timing_line(report), ""]
    lines += [f"Scores ×100. Dimensions: {', '.join(dims_header)}.", "",
              f"## {_label(MAIN_METRIC)} by setting", ""]
    rows = [[setting, str(sum(t.setting == setting for t in report.tasks)), *(_score(v) for v in by_dim.values())]
            for setting, by_dim in report.aggregates().items()]
    bias = report.language_bias()
    if bias:
        rows.append([f"multilingual {_label(BIAS_METRIC)} (ideal 0)", "", *(_score(v) for v in bias.values())])
    lines += _table(["setting", "tasks", *dims_header], rows) + ["", f"## Tasks at dimension {full}", ""]
    extra = [BIAS_METRIC] if any(BIAS_METRIC in t.metrics[full] for t in report.tasks) else []
    columns = [*report.metrics, *extra]
    rows = [[t.name, t.setting, _langs(t), str(t.n_queries), str(t.n_docs),
             *(_score(t.metrics[full].get(m)) for m in columns)] for t in report.tasks]
    lines += _table(["task", "setting", "languages", "queries", "docs", *map(_label, columns)], rows)
    if len(report.dims) > 1:
        lines += ["", f"## {_label(MAIN_METRIC)} by embedding dimension (Matryoshka)", ""]
        rows = [[t.name, *(_score(t.metrics[d][MAIN_METRIC]) for d in report.dims)] for t in report.tasks]
        lines += _table(["task", *dims_header], rows)
    for t in report.tasks:
        if t.by_query_lang.get(full):
            langs = list(t.by_query_lang[full])
            lines += ["", f"## {t.name}: {_label(MAIN_METRIC)} by query language (dimension {full})", ""]
            lines += _table(["dim", *langs], [[str(d), *(_score(t.by_query_lang[d][lang]) for lang in langs)]
                                              for d in report.dims])
    return "\n".join(lines) + "\n"


def _delta(before: float | None, after: float | None) -> str:
    return "—" if before is None or after is None else f"{100 * (after - before):+.2f}"


def compare_reports(before: EvalReport, after: EvalReport, *, metric: str = MAIN_METRIC, dim: int | None = None,
                    labels: tuple[str, str] = ("before", "after")) -> str:
    """Markdown table of ``metric`` per task and per setting for two reports, with deltas (x100).

    ``dim`` defaults to the largest dimension both reports evaluated. Tasks in only one report
    show a dash on the other side.
    """
    common = sorted(set(before.dims) & set(after.dims), reverse=True)
    if dim is None:
        if not common:
            raise ValueError(f"the reports share no dimension ({before.dims} vs {after.dims}); pass dim=")
        dim = common[0]
    elif dim not in common:
        raise ValueError(f"dimension {dim} is not in both reports ({before.dims} vs {after.dims})")

    def value(report: EvalReport, name: str) -> float | None:
        found = [t for t in report.tasks if t.name == name]
        return found[0].metrics[dim].get(metric) if found else None

    names = list(dict.fromkeys([t.name for t in before.tasks] + [t.name for t in after.tasks]))
    rows = [[name, _score(value(before, name)), _score(value(after, name)),
             _delta(value(before, name), value(after, name))] for name in names]
    agg_before, agg_after = before.aggregates(metric), after.aggregates(metric)
    for setting in SETTINGS:
        b, a = agg_before.get(setting, {}).get(dim), agg_after.get(setting, {}).get(dim)
        if b is not None or a is not None:
            rows.append([f"**mean {setting}**", _score(b), _score(a), _delta(b, a)])
    bias_b, bias_a = before.language_bias().get(dim), after.language_bias().get(dim)
    if bias_b is not None or bias_a is not None:
        rows.append([f"**multilingual {_label(BIAS_METRIC)}** (lower is better)", _score(bias_b), _score(bias_a),
                     _delta(bias_b, bias_a)])
    title = [f"{_label(metric)} at dimension {dim} (×100): `{before.model}` ({labels[0]}) vs "
             f"`{after.model}` ({labels[1]})", ""]
    return "\n".join(title + _table(["task", labels[0], labels[1], "delta"], rows)) + "\n"


def compare_by_dimension(before: EvalReport, after: EvalReport, *, metric: str = MAIN_METRIC,
                         labels: tuple[str, str] = ("before", "after")) -> str:
    """Markdown table of the per-setting mean of ``metric`` at every dimension both reports share.

    Each cell reads ``before → after (delta)``, so Matryoshka gains at small dimensions are visible
    next to the full-size result.
    """
    dims = sorted(set(before.dims) & set(after.dims), reverse=True)
    agg_before, agg_after = before.aggregates(metric), after.aggregates(metric)
    bias_before, bias_after = before.language_bias(), after.language_bias()

    def cell(b: float | None, a: float | None) -> str:
        return f"{_score(b)} → {_score(a)} ({_delta(b, a)})"

    rows = [[f"mean {setting}", *(cell(agg_before[setting].get(d), agg_after.get(setting, {}).get(d)) for d in dims)]
            for setting in SETTINGS if setting in agg_before]
    if bias_before:
        rows.append([f"multilingual {_label(BIAS_METRIC)} (lower is better)",
                     *(cell(bias_before.get(d), bias_after.get(d)) for d in dims)])
    title = [f"{_label(metric)} (×100) by embedding dimension, {labels[0]} → {labels[1]}", ""]
    return "\n".join(title + _table(["setting", *(str(d) for d in dims)], rows)) + "\n"
