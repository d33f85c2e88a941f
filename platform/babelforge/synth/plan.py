"""Quota planning: which (seed passage, persona, task, language) combinations to generate.

The plan is deterministic for a given corpus, persona library and settings, so a rerun rebuilds
exactly the same plan and resumes it shard by shard.

- Seeds: :func:`sample_seed_passages` streams the corpus through Ray Data and keeps, per
  language, the ``quota`` passages with the smallest ``hash(seed, id)`` (a uniform sample that
  does not depend on file order or block layout), plus the same over all languages as a fallback
  for languages the corpus lacks. Only about 1.5x the sample reaches the driver.
- Combos: :func:`build_plan` splits each language's quota evenly over the task types ("task
  diversity over language diversity": every language gets every task once its quota covers
  them), draws a persona and one of the task's instructions per item, and uses same-language
  seeds first, then other-language seeds (the prompt asks for the target language either way).
  Bitext pairs the language with ``bitext_pivot`` (the pivot itself pairs with the next
  language of the list). The plan is shuffled so every shard mixes languages and tasks.

    >>> pool = SeedPool({"en": [SeedPassage("d1", "A text about trains.", "en")]}, [])
    >>> personas = [Persona("chef", "A chef.")]
    >>> plan = build_plan(pool, personas, ["en"], {"en": 2}, ["qa", "short_short"], seed=0)
    >>> sorted(item.task for item in plan), plan[0].seed_id
    (['qa', 'short_short'], 'd1')
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import random
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from babelforge.data.shards import list_parquet_files, resolve_filesystem
from babelforge.errors import DataFormatError
from babelforge.schema import CORPUS_SCHEMA, require_columns
from babelforge.synth.personas import Persona
from babelforge.synth.prompts import language_name
from babelforge.synth.tasks import get_task

log = logging.getLogger(__name__)

__all__ = ["SeedPassage", "SeedPool", "PlanItem", "PlanShard", "sample_seed_passages", "build_plan",
           "shard_plan", "plan_fingerprint"]

_ANY = "*"
_KEY_SPACE = 2 ** 63
_CANDIDATE_SCHEMA = pa.schema([("key", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("lang", pa.string())])


@dataclass(frozen=True)
class SeedPassage:
    """A corpus passage (cut to the configured length) used as a generation's topic."""

    id: str
    text: str
    lang: str | None


@dataclass
class SeedPool:
    """Sampled seeds: per language, and over all languages (fallback), in sample order."""

    by_language: dict[str, list[SeedPassage]]
    any_language: list[SeedPassage]

    def seeds_for(self, lang: str, count: int) -> list[SeedPassage]:
        """``count`` seeds for ``lang``: its own passages, then others, reused only when exhausted."""
        own = self.by_language.get(lang, [])
        own_ids = {p.id for p in own}
        ordered = own + [p for p in self.any_language if p.id not in own_ids]
        if not ordered:
            raise DataFormatError("the corpus has no usable seed passages (all shorter than seeds.min_chars?)")
        if len(own) < count:
            log.info("synth: %d of %d seeds for %s come from other languages%s", count - min(count, len(own)),
                     count, lang, " (reused)" if len(ordered) < count else "")
        return [ordered[i % len(ordered)] for i in range(count)]


@dataclass(frozen=True)
class PlanItem:
    """One planned generation. ``positive_lang`` differs from ``lang`` only for bitext."""

    id: str
    lang: str
    positive_lang: str
    task: str
    instruction: str
    persona_id: str
    persona: str
    seed_id: str
    seed_text: str
    seed_lang: str | None


@dataclass(frozen=True)
class PlanShard:
    """Consecutive plan items that are generated, committed and resumed together."""

    name: str
    items: list[PlanItem]


def _sample_key(seed: int, doc_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # fits int64


def _cut(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def _eligible(batch: pa.Table, min_chars: int) -> pa.Table:
    lengths = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(batch["text"], "")))
    return batch.filter(pc.greater_equal(lengths, min_chars))


def _count_languages(batch: pa.Table, *, min_chars: int) -> pa.Table:
    """Per block: how many eligible passages each language has (null: unknown language)."""
    counts = pc.value_counts(_eligible(batch, min_chars)["lang"])
    return pa.table({"lang": counts.field("values"), "count": counts.field("counts")})


def _candidates(batch: pa.Table, *, seed: int, thresholds: dict[str, int], any_threshold: int, min_chars: int,
                max_chars: int) -> pa.Table:
    """Per block: eligible passages whose key falls under their language's (or the global) threshold."""
    rows = []
    for row in _eligible(batch, min_chars).to_pylist():
        key = _sample_key(seed, str(row["id"]))
        if key < any_threshold or key < thresholds.get(row["lang"], 0):
            rows.append({"key": key, "id": str(row["id"]), "text": _cut(row["text"], max_chars), "lang": row["lang"]})
    return pa.Table.from_pylist(rows, schema=_CANDIDATE_SCHEMA)


def _threshold(quota: int, population: int) -> int:
    """A key bound under which ~1.5x ``quota`` (+64) of ``population`` uniform keys fall."""
    if population <= 0:
        return 0
    return min(_KEY_SPACE, int(_KEY_SPACE * (1.5 * quota + 64) / population))


def sample_seed_passages(corpus: str, quotas: Mapping[str, int], *, seed: int, min_chars: int,
                         max_chars: int) -> SeedPool:
    """Sample seeds from CORPUS_SCHEMA parquet under ``corpus`` (a directory, file or URI).

    Two streaming passes: count eligible passages per language, then send the driver only the
    passages under a per-language hash threshold (~1.5x the quota), of which it keeps the
    ``quota`` smallest keys.
    """
    import ray

    files = list_parquet_files(corpus)
    if not files:
        raise DataFormatError(f"synth input {corpus}: no parquet files (run `babelforge ingest` first)")
    fs, _ = resolve_filesystem(corpus)
    require_columns(pq.read_schema(files[0], filesystem=fs).names, CORPUS_SCHEMA, f"synth input {files[0]}")
    quotas = dict(quotas)
    any_quota = max(quotas.values())
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(["id", "text", "lang"])
    population: dict[str | None, int] = {}
    counted = ds.map_batches(_count_languages, batch_format="pyarrow", fn_kwargs={"min_chars": min_chars})
    for batch in counted.iter_batches(batch_format="pyarrow"):
        for lang, count in zip(batch["lang"].to_pylist(), batch["count"].to_pylist()):
            population[lang] = population.get(lang, 0) + count
    thresholds = {lang: _threshold(quota, population.get(lang, 0)) for lang, quota in quotas.items()}
    candidates = ds.map_batches(_candidates, batch_format="pyarrow", fn_kwargs=dict(
        seed=seed, thresholds=thresholds, any_threshold=_threshold(any_quota, sum(population.values())),
        min_chars=min_chars, max_chars=max_chars))
    # Max-heaps on the key keep the `limit` smallest; `arrival` breaks ties between duplicate ids.
    heaps: dict[str, list[tuple[int, str, int, str, str | None]]] = {lang: [] for lang in [*quotas, _ANY]}
    arrival = 0
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=4096):
        for key, doc_id, text, lang in zip(*(batch[c].to_pylist() for c in ("key", "id", "text", "lang"))):
            arrival += 1
            targets = [(_ANY, any_quota)] + ([(lang, quotas[lang])] if lang in quotas else [])
            for group, limit in targets:
                entry = (-key, doc_id, -arrival, text, lang)
                if len(heaps[group]) < limit:
                    heapq.heappush(heaps[group], entry)
                elif entry > heaps[group][0]:
                    heapq.heapreplace(heaps[group], entry)

    def ordered(group: str) -> list[SeedPassage]:
        return [SeedPassage(doc_id, text, lang) for _, doc_id, _, text, lang in sorted(heaps[group], reverse=True)]

    return SeedPool({lang: ordered(lang) for lang in quotas}, ordered(_ANY))


def _bitext_partner(lang: str, languages: Sequence[str], pivot: str) -> str | None:
    if lang != pivot:
        return pivot
    others = [other for other in languages if other != pivot]
    return others[0] if others else None


def build_plan(pool: SeedPool, personas: Sequence[Persona], languages: Sequence[str], quotas: Mapping[str, int],
               tasks: Sequence[str], *, seed: int, bitext_pivot: str = "en",
               language_names: Mapping[str, str] | None = None) -> list[PlanItem]:
    """All planned generations, shuffled deterministically by ``seed``."""
    rng = random.Random(seed)
    items: list[PlanItem] = []
    for lang in languages:
        partner = _bitext_partner(lang, languages, bitext_pivot)
        lang_tasks = [t for t in tasks if t != "bitext" or partner]
        if len(lang_tasks) < len(tasks):
            log.warning("synth: no bitext for %s (no other language to pair it with)", lang)
        quota = quotas[lang]
        extra = set(rng.sample(lang_tasks, quota % len(lang_tasks)))
        sequence = [t for t in lang_tasks for _ in range(quota // len(lang_tasks) + (t in extra))]
        rng.shuffle(sequence)
        counters: dict[str, int] = {}
        for task_name, passage in zip(sequence, pool.seeds_for(lang, quota)):
            task = get_task(task_name)
            positive_lang = partner if task.cross_lingual and partner else lang
            names = {"query_language": language_name(lang, language_names),
                     "positive_language": language_name(positive_lang, language_names)}
            persona = rng.choice(personas)
            number = counters[task_name] = counters.get(task_name, -1) + 1
            items.append(PlanItem(
                id=f"{lang}-{task_name}-{number:05d}", lang=lang, positive_lang=positive_lang, task=task_name,
                instruction=rng.choice(task.instructions).format(**names), persona_id=persona.id,
                persona=persona.persona, seed_id=passage.id, seed_text=passage.text, seed_lang=passage.lang))
    rng.shuffle(items)
    return items


def shard_plan(items: Sequence[PlanItem], rows_per_shard: int) -> list[PlanShard]:
    """Consecutive chunks of ``rows_per_shard`` items named ``part-00000``, ``part-00001``..."""
    return [PlanShard(f"part-{i // rows_per_shard:05d}", list(items[i:i + rows_per_shard]))
            for i in range(0, len(items), rows_per_shard)]


def plan_fingerprint(items: Sequence[PlanItem], rows_per_shard: int) -> str:
    """Digest of the plan and its sharding; a rerun must match it to resume."""
    digest = hashlib.sha256(str(rows_per_shard).encode())
    for item in items:
        digest.update(json.dumps(asdict(item), sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]
