"""The ``synth`` stage: corpus seeds -> planned generations -> validated examples, shard by shard.

:func:`run_synth` samples seed passages from the corpus, builds the deterministic plan, cuts it
into shards of ``rows_per_shard`` planned generations and generates them in *rounds*. A round is
one Ray Data pipeline (requests -> backend -> parse and validate) over the next
``shards_per_round`` pending shards plus the items of earlier shards that failed their previous
attempt, so retries ride along with new work instead of costing extra engine starts. A failed
item is re-prompted with the next attempt's temperature and seed until ``max_attempts``; its
last failure is quarantined with the raw generation. A shard is committed
(:class:`~babelforge.data.shards.ShardWriter`) once each of its items is kept or quarantined,
so per shard ``rows_in == kept + quarantined`` and a rerun skips committed shards.
``plan.json`` in the output directory records the plan's fingerprint; a rerun whose plan
differs (other config or corpus) refuses to mix its shards with the old ones.

Each shard records ``generations``, ``prompt_tokens``, ``generated_tokens`` and
``generation_seconds`` (its share of the rounds' wall time, model loading included); the
summary adds ``generated_tokens_per_s`` and ``accepted_per_s``.

    >>> cfg = load_config("jobs/configs/synth.yaml", SynthJobConfig)   # doctest: +SKIP
    >>> print(format_summary(run_synth(cfg)))                           # doctest: +SKIP
    [synth] shards=2 rows in=24 kept=9 quarantined=15 (invalid_json=3, wrong_language=12)
    [synth] 41 generations, 2630 tokens generated: 11.2 tokens/s, 0.04 accepted samples/s
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from babelforge.data.shards import (REJECT_DETAIL, REJECT_REASON, REJECT_RECORD, REJECT_SOURCE, ShardSink,
                                    ShardWriter, StageSummary)
from babelforge.errors import ConfigError
from babelforge.schema import SYNTHETIC_SCHEMA
from babelforge.synth.backends import GenerationBackend, make_backend
from babelforge.synth.config import SynthJobConfig, SynthSettings
from babelforge.synth.parse import Rejection, check_generation
from babelforge.synth.personas import load_personas
from babelforge.synth.plan import (PlanItem, PlanShard, build_plan, plan_fingerprint, sample_seed_passages,
                                   shard_plan)
from babelforge.synth.prompts import build_messages

log = logging.getLogger(__name__)

__all__ = ["run_synth", "format_summary", "PLAN_FILE"]

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class _Request:
    item: PlanItem
    shard: str
    attempt: int


@dataclass
class _OpenShard:
    sink: ShardSink
    pending: int
    generations: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0


def _sampling_seed(seed: int, item_id: str, attempt: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{item_id}\x00{attempt}".encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def _check_row(row: dict[str, Any], *, require_hard_negative: bool, langid_min_chars: int) -> dict[str, Any]:
    """Ray Data map: parse and validate one generation (runs on the workers)."""
    out = {"id": row["id"], "generated_text": row["generated_text"], "prompt_tokens": int(row["prompt_tokens"]),
           "completion_tokens": int(row["completion_tokens"]), "reason": "", "detail": "",
           "query": "", "positive": "", "hard_negative": ""}
    if row["generation_error"]:
        out.update(reason="backend_error", detail=row["generation_error"])
        return out
    try:
        texts = check_generation(row["generated_text"], row["task"], row["lang"], row["positive_lang"],
                                 require_hard_negative=require_hard_negative, langid_min_chars=langid_min_chars)
    except Rejection as rejection:
        out.update(reason=rejection.reason, detail=rejection.detail)
        return out
    out.update(query=texts.query, positive=texts.positive, hard_negative=texts.hard_negative or "")
    return out


class _Rounds:
    """Generates the pending shards round by round and commits each shard when it is complete."""

    def __init__(self, writer: ShardWriter, backend: GenerationBackend, settings: SynthSettings) -> None:
        self.writer = writer
        self.backend = backend
        self.settings = settings
        self.open: dict[str, _OpenShard] = {}

    def run(self, shards: list[PlanShard]) -> None:
        queue = list(shards)
        retries: list[_Request] = []
        try:
            while queue or retries:
                requests = retries
                for shard in queue[:self.settings.shards_per_round]:
                    self.open[shard.name] = _OpenShard(self.writer.open(shard.name, rows_in=len(shard.items)),
                                                       pending=len(shard.items))
                    requests = requests + [_Request(item, shard.name, 1) for item in shard.items]
                del queue[:self.settings.shards_per_round]
                retries = self._round(requests)
                self._commit_complete()
        except BaseException:
            for shard in self.open.values():
                shard.sink.abort()
            raise

    def _round(self, requests: list[_Request]) -> list[_Request]:
        """Generate ``requests``; write final outcomes; return the requests to retry."""
        started = time.time()
        by_id = {r.item.id: r for r in requests}
        retries: list[_Request] = []
        accepted = 0
        for batch in self._results(requests):
            rows_by_shard: dict[str, list[dict[str, Any]]] = {}
            for result in batch:
                request = by_id.pop(result["id"], None)
                if request is None:
                    raise RuntimeError(f"synth round: unexpected or duplicate result for {result['id']!r}")
                shard = self.open[request.shard]
                shard.generations += 1
                shard.prompt_tokens += result["prompt_tokens"]
                shard.generated_tokens += result["completion_tokens"]
                if not result["reason"]:
                    accepted += 1
                    rows_by_shard.setdefault(request.shard, []).append(self._kept_row(request.item, result))
                elif request.attempt < self.settings.max_attempts:
                    retries.append(replace(request, attempt=request.attempt + 1))
                else:
                    rows_by_shard.setdefault(request.shard, []).append(self._quarantine_row(request, result))
            for name, rows in rows_by_shard.items():
                self.open[name].sink.write(pa.Table.from_pylist(rows))
                self.open[name].pending -= len(rows)
        if by_id:
            raise RuntimeError(f"synth round: {len(by_id)} of {len(requests)} requests never came back "
                               f"(e.g. {next(iter(by_id))!r})")
        seconds = time.time() - started
        for name, count in _count_by_shard(requests).items():
            self.open[name].generation_seconds += seconds * count / len(requests)
        log.info("synth round: %d requests (%d retries), %d accepted, %d to retry, %.1f s", len(requests),
                 sum(r.attempt > 1 for r in requests), accepted, len(retries), seconds)
        return retries

    def _results(self, requests: list[_Request]) -> Iterator[list[dict[str, Any]]]:
        import ray

        s = self.settings
        rows = [{"id": r.item.id, "task": r.item.task, "lang": r.item.lang, "positive_lang": r.item.positive_lang,
                 "messages": json.dumps(build_messages(r.item, s.one_shot, s.language_names), ensure_ascii=False),
                 "temperature": s.sampling.temperature_for(r.attempt),
                 "sampling_seed": _sampling_seed(s.seed, r.item.id, r.attempt)} for r in requests]
        ds = self.backend.apply(ray.data.from_items(rows))
        ds = ds.map(_check_row, fn_kwargs={"require_hard_negative": s.validation.require_hard_negative,
                                           "langid_min_chars": s.validation.langid_min_chars})
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=256):
            yield batch.to_pylist()

    def _row(self, item: PlanItem) -> dict[str, Any]:
        """Every output column (pyarrow takes a table's columns from its first row)."""
        return {"id": item.id, "query": None, "positive": None, "hard_negative": None, "lang": item.lang,
                "positive_lang": item.positive_lang, "task": item.task, "instruction": item.instruction,
                "persona": item.persona, "seed_id": item.seed_id, "backend": self.backend.name,
                "model": self.backend.model, REJECT_REASON: None, REJECT_DETAIL: None, REJECT_RECORD: None,
                REJECT_SOURCE: None}

    def _kept_row(self, item: PlanItem, result: dict[str, Any]) -> dict[str, Any]:
        return {**self._row(item), "query": result["query"], "positive": result["positive"],
                "hard_negative": result["hard_negative"] or None}

    def _quarantine_row(self, request: _Request, result: dict[str, Any]) -> dict[str, Any]:
        item = request.item
        languages = item.lang if item.positive_lang == item.lang else f"{item.lang}->{item.positive_lang}"
        return {**self._row(item), REJECT_REASON: result["reason"],
                REJECT_DETAIL: f"attempt {request.attempt}/{self.settings.max_attempts} ({item.task}, {languages}): "
                               f"{result['detail']}",
                REJECT_RECORD: result["generated_text"], REJECT_SOURCE: f"plan item {item.id}, seed {item.seed_id}"}

    def _commit_complete(self) -> None:
        for name in [n for n, shard in self.open.items() if shard.pending == 0]:
            shard = self.open.pop(name)
            shard.sink.extra.update(generations=shard.generations, prompt_tokens=shard.prompt_tokens,
                                    generated_tokens=shard.generated_tokens,
                                    generation_seconds=round(shard.generation_seconds, 3))
            shard.sink.commit()


def _count_by_shard(requests: list[_Request]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in requests:
        counts[request.shard] = counts.get(request.shard, 0) + 1
    return counts


def _check_plan(writer: ShardWriter, fingerprint: str, planned: int, shards: int, rows_per_shard: int) -> None:
    """Record the plan in ``plan.json``; refuse to resume a different plan over committed shards."""
    path = posixpath.join(writer.root, PLAN_FILE)
    if writer.fs.get_file_info(path).type == pafs.FileType.File:
        with writer.fs.open_input_stream(path) as f:
            previous = json.loads(f.read().decode("utf-8"))
        if previous.get("fingerprint") != fingerprint and writer.completed():
            raise ConfigError(f"{writer.output_dir}: holds {len(writer.completed())} shard(s) of a different synth "
                              f"plan ({previous.get('fingerprint')} != {fingerprint}: the config or the corpus "
                              "changed); write to a new output_dir or delete the old one")
    payload = {"fingerprint": fingerprint, "planned": planned, "shards": shards, "rows_per_shard": rows_per_shard}
    with writer.fs.open_output_stream(path) as f:
        f.write(json.dumps(payload, indent=2).encode("utf-8"))


def run_synth(config: SynthJobConfig) -> StageSummary:
    """Run (or resume) the synth stage; Ray must be initialised."""
    s = config.synth
    personas = load_personas(s.personas)
    quotas = {lang: s.quota_for(lang) for lang in s.languages}
    pool = sample_seed_passages(config.input, quotas, seed=s.seed, min_chars=s.seeds.min_chars,
                                max_chars=s.seeds.max_chars)
    items = build_plan(pool, personas, s.languages, quotas, s.tasks, seed=s.seed, bitext_pivot=s.bitext_pivot,
                       language_names=s.language_names)
    shards = shard_plan(items, s.rows_per_shard)
    writer = ShardWriter(config.output_dir, stage="synth", schema=SYNTHETIC_SCHEMA)
    _check_plan(writer, plan_fingerprint(items, s.rows_per_shard), len(items), len(shards), s.rows_per_shard)
    pending = [shard for shard in shards if not writer.is_done(shard.name)]
    log.info("synth: %d planned generations in %d shards (%d already committed), %d personas, backend %s",
             len(items), len(shards), len(shards) - len(pending), len(personas), s.backend.kind)
    if pending:
        _Rounds(writer, make_backend(s.backend, s.sampling), s).run(pending)
    summary = writer.summary()
    seconds = summary.extra.get("generation_seconds", 0)
    if seconds:
        summary.extra["generated_tokens_per_s"] = round(summary.extra.get("generated_tokens", 0) / seconds, 2)
        summary.extra["accepted_per_s"] = round(summary.kept / seconds, 4)
    return summary


def format_summary(summary: StageSummary) -> str:
    """The stage's counts and throughput, as printed by ``babelforge synth``."""
    extra = summary.extra
    lines = [summary.format()]
    if extra.get("generation_seconds"):
        lines.append(f"[{summary.stage}] {extra.get('generations', 0)} generations, "
                     f"{extra.get('generated_tokens', 0)} tokens generated in {extra['generation_seconds']:.1f} s: "
                     f"{extra['generated_tokens_per_s']} tokens/s, {extra['accepted_per_s']} accepted samples/s")
    return "\n".join(lines)
