"""Chat prompts asking an LLM for one (query, positive, hard negative) example as strict JSON.

A prompt is a list of OpenAI-style chat messages: a system message fixing the output format, an
optional one-shot exchange (the task's worked example and its JSON answer), then the request
built from a plan item: persona, task, retrieval instruction, target language(s) and the seed
passage from the corpus::

    >>> from babelforge.synth.plan import PlanItem
    >>> item = PlanItem(id="de-qa-00000", lang="de", positive_lang="de", task="qa",
    ...                 instruction="Given a question, retrieve passages that answer the question",
    ...                 persona_id="chef", persona="A restaurant chef.", seed_id="doc-1",
    ...                 seed_text="Tomatoes ripen faster next to bananas.", seed_lang="en")
    >>> messages = build_messages(item, one_shot=False)
    >>> [m["role"] for m in messages]
    ['system', 'user']
    >>> "Write all three texts in German." in messages[1]["content"]
    True
"""

from __future__ import annotations

import json
from typing import Mapping, TYPE_CHECKING

from babelforge.resources import LANGUAGE_NAMES
from babelforge.synth.tasks import TaskExample, TaskType, get_task

if TYPE_CHECKING:
    from babelforge.synth.plan import PlanItem

__all__ = ["SYSTEM_PROMPT", "RESPONSE_JSON_SCHEMA", "build_messages", "language_name"]

SYSTEM_PROMPT = ("You write training data for a multilingual search engine. You answer with exactly one JSON "
                 'object with the string fields "query", "positive" and "hard_negative", and nothing else.')

# For engines with structured output (vLLM ``structured_outputs``, OpenAI ``response_format``).
RESPONSE_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in ("query", "positive", "hard_negative")},
    "required": ["query", "positive", "hard_negative"],
    "additionalProperties": False,
}


def language_name(code: str, extra: Mapping[str, str] | None = None) -> str:
    """English name of an ISO 639-1 code (``extra`` adds or overrides names)."""
    names = {**LANGUAGE_NAMES, **(extra or {})}
    if code not in names:
        raise KeyError(f"no language name for {code!r}; add it under synth.language_names")
    return names[code]


def _request(task: TaskType, persona: str, seed: str, instruction: str, query_language: str,
             positive_language: str) -> str:
    names = {"query_language": query_language, "positive_language": positive_language}
    if task.cross_lingual:
        languages = f"Write the query in {query_language} and the positive and hard_negative in {positive_language}."
    else:
        languages = f"Write all three texts in {query_language}."
    return "\n".join([
        f"Persona: {persona}",
        f"Retrieval task: {instruction}.",
        f"Write {task.goal.format(**names)}:",
        f"- query: {task.query_spec.format(**names)}",
        f"- positive: {task.positive_spec.format(**names)}",
        f"- hard_negative: {task.hard_negative_spec.format(**names)}",
        languages,
        f"Seed text (use it for the topic; it may be in another language): {seed}",
        'Answer with JSON: {"query": "...", "positive": "...", "hard_negative": "..."}',
    ])


def _example_exchange(task: TaskType, extra_names: Mapping[str, str] | None) -> list[dict[str, str]]:
    ex: TaskExample = task.example
    query_language = language_name(ex.query_lang, extra_names)
    positive_language = language_name(ex.positive_lang, extra_names)
    instruction = task.instructions[0].format(query_language=query_language, positive_language=positive_language)
    user = _request(task, ex.persona, ex.seed, instruction, query_language, positive_language)
    answer = json.dumps({"query": ex.query, "positive": ex.positive, "hard_negative": ex.hard_negative},
                        ensure_ascii=False)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def build_messages(item: "PlanItem", one_shot: bool = True,
                   language_names: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Chat messages asking for ``item``'s example (the instruction is already formatted)."""
    task = get_task(item.task)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if one_shot:
        messages += _example_exchange(task, language_names)
    messages.append({"role": "user", "content": _request(
        task, item.persona, item.seed_text, item.instruction, language_name(item.lang, language_names),
        language_name(item.positive_lang, language_names))})
    return messages
