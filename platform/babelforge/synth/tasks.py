"""Task types of the synthesis recipe (KaLM-Embedding; "task diversity matters more than language
diversity").

Each :class:`TaskType` says what the LLM writes for the query, the positive and the hard negative,
how long each may be, and carries the retrieval *instructions* the query is written for: at
training time the instruction becomes the query-side prompt ("Instruct: ... Query: ..."), so a
model learns one embedding space for many tasks. Every task also has a worked example, used as a
one-shot exchange in the prompt (small models follow a format they have seen far better than one
they are told about).

``bitext`` is cross-lingual: the query is in the target language and the positive is its
translation into a partner language (the plan's ``bitext_pivot``, English by default).

    >>> task = TASKS["qa"]
    >>> task.instructions[0]
    'Given a question, retrieve passages that answer the question'
    >>> sorted(TASKS) == sorted(TASK_TYPES)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from babelforge.schema import TASK_TYPES

__all__ = ["TaskType", "TaskExample", "TASKS", "FIELDS", "get_task"]

FIELDS = ("query", "positive", "hard_negative")


@dataclass(frozen=True)
class TaskExample:
    """A worked example of a task (English, or English -> German for bitext)."""

    persona: str
    seed: str
    query: str
    positive: str
    hard_negative: str
    query_lang: str = "en"
    positive_lang: str = "en"


@dataclass(frozen=True)
class TaskType:
    """What to generate for one task type, and how it is used for retrieval.

    The ``*_spec`` strings may use ``{query_language}`` and ``{positive_language}``; so may the
    instructions (for bitext). ``min_chars`` / ``max_chars`` bound each field's length (loose
    enough for scripts without spaces: a Chinese question can have six characters).
    ``max_length_ratio`` bounds ``len(positive) / len(query)`` both ways (translations).
    """

    name: str
    goal: str
    query_spec: str
    positive_spec: str
    hard_negative_spec: str
    instructions: tuple[str, ...]
    example: TaskExample
    min_chars: dict[str, int] = field(default_factory=dict)
    max_chars: dict[str, int] = field(default_factory=dict)
    max_length_ratio: float | None = None
    cross_lingual: bool = False


_SHORT_LONG = TaskType(
    name="short_long",
    goal="a short search query and a longer passage that answers it",
    query_spec="a short search query (2 to 10 words) this person would type",
    positive_spec="a passage of 3 to 5 sentences that fully answers the query",
    hard_negative_spec="a passage on a related topic that looks relevant but does not answer the query",
    instructions=(
        "Given a web search query, retrieve relevant passages that answer the query",
        "Given a short user query, retrieve documents that help answer it",
        "Given a search query about a topic, retrieve detailed passages about it",
    ),
    example=TaskExample(
        persona="A beekeeper in rural Spain whose hives suffer from drought.",
        seed="Honey production fell sharply this year because of the long drought.",
        query="why is there less honey this year",
        positive="Honey harvests dropped this year because the long drought left few flowers. Without "
                 "flowers, bees cannot collect enough nectar, so colonies store less honey.",
        hard_negative="Honey is a sweet food made by bees from the nectar of flowers and has been eaten "
                      "for thousands of years.",
    ),
    min_chars={"query": 2, "positive": 30, "hard_negative": 20},
    max_chars={"query": 200, "positive": 2000, "hard_negative": 2000},
)

_LONG_LONG = TaskType(
    name="long_long",
    goal="two related passages: a document and another document a reader of it would look for",
    query_spec="a passage of 2 to 4 sentences, like a paragraph from an article or report",
    positive_spec="another passage of 2 to 4 sentences on the same subject, written differently",
    hard_negative_spec="a passage of 2 to 4 sentences that shares words with the first but is about "
                       "a different subject",
    instructions=(
        "Given a passage, retrieve passages that discuss the same topic",
        "Given a news article, retrieve articles about the same event",
        "Given a document, retrieve documents that expand on its subject",
    ),
    example=TaskExample(
        persona="A city planner working on public transport corridors.",
        seed="The council approved two new tram lines to connect the northern suburbs with the centre.",
        query="The city council voted to build two tram lines linking the northern suburbs to the city "
              "centre. Construction is planned to start next spring.",
        positive="New tram connections will soon serve residents of the northern districts. Work on the "
                 "lines, approved by the council, begins in the spring.",
        hard_negative="The council also voted on a new budget for parks in the northern suburbs, including "
                      "playgrounds and sports fields.",
    ),
    min_chars={"query": 30, "positive": 30, "hard_negative": 20},
    max_chars={"query": 2000, "positive": 2000, "hard_negative": 2000},
)

_SHORT_SHORT = TaskType(
    name="short_short",
    goal="a sentence and a paraphrase of it with the same meaning (semantic similarity)",
    query_spec="one sentence",
    positive_spec="a paraphrase of that sentence: the same meaning in different words",
    hard_negative_spec="a sentence with similar words but a different meaning",
    instructions=(
        "Retrieve sentences that are semantically equivalent to the given sentence",
        "Given a sentence, retrieve its paraphrases",
        "Retrieve semantically similar text",
    ),
    example=TaskExample(
        persona="A car mechanic diagnosing engine problems.",
        seed="The engine would not start because the battery was empty.",
        query="The car did not start because its battery was flat.",
        positive="A dead battery kept the car from starting.",
        hard_negative="The car started even though the battery was old.",
    ),
    min_chars={"query": 4, "positive": 4, "hard_negative": 4},
    max_chars={"query": 400, "positive": 400, "hard_negative": 400},
)

_QA = TaskType(
    name="qa",
    goal="a question and a passage that answers it",
    query_spec="a natural question of one sentence",
    positive_spec="a passage of 2 or 3 sentences that answers the question",
    hard_negative_spec="a passage on the same topic that does not answer the question",
    instructions=(
        "Given a question, retrieve passages that answer the question",
        "Given a factual question, retrieve the passage that contains its answer",
        "Given a question from a user, retrieve the answer",
    ),
    example=TaskExample(
        persona="A hospital pharmacist who answers doctors' questions about drug interactions.",
        seed="Grapefruit juice can raise the blood levels of some cholesterol medicines.",
        query="Why should patients on statins avoid grapefruit juice?",
        positive="Grapefruit juice blocks an enzyme in the gut that breaks down some statins. The drug "
                 "then builds up in the blood, which raises the risk of muscle damage.",
        hard_negative="Statins lower cholesterol by reducing how much of it the liver produces, and they "
                      "are usually taken once a day.",
    ),
    min_chars={"query": 4, "positive": 20, "hard_negative": 20},
    max_chars={"query": 300, "positive": 1500, "hard_negative": 1500},
)

_BITEXT = TaskType(
    name="bitext",
    goal="a sentence in {query_language} and its translation into {positive_language}",
    query_spec="one or two sentences in {query_language}",
    positive_spec="the exact translation of the query into {positive_language}",
    hard_negative_spec="a {positive_language} sentence that looks like the translation but changes "
                       "one key detail (a number, a name or a negation)",
    instructions=(
        "Given a sentence in {query_language}, retrieve its translation in {positive_language}",
        "Retrieve parallel sentences",
        "Given a text, retrieve its translation",
    ),
    example=TaskExample(
        persona="A railway dispatcher managing delays on a regional train network.",
        seed="Trains to the airport run every fifteen minutes until midnight.",
        query="Trains to the airport run every fifteen minutes until midnight.",
        positive="Züge zum Flughafen fahren bis Mitternacht alle fünfzehn Minuten.",
        hard_negative="Züge zum Flughafen fahren bis Mitternacht alle dreißig Minuten.",
        positive_lang="de",
    ),
    min_chars={"query": 2, "positive": 2, "hard_negative": 2},
    max_chars={"query": 600, "positive": 800, "hard_negative": 800},
    max_length_ratio=4.0,  # Chinese or Japanese vs a Latin-script language: about 1:3 in characters
    cross_lingual=True,
)

TASKS: dict[str, TaskType] = {t.name: t for t in (_SHORT_LONG, _LONG_LONG, _SHORT_SHORT, _QA, _BITEXT)}
assert tuple(TASKS) == TASK_TYPES, "tasks must match babelforge.schema.TASK_TYPES"


def get_task(name: str) -> TaskType:
    """The task type called ``name`` (a KeyError lists the known ones)."""
    if name not in TASKS:
        raise KeyError(f"unknown task type {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
