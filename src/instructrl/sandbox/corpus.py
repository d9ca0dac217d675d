"""The sandbox's "web": pretraining documents, held-out text, and mixed-quality responses.

The corpus plays the role of GPT-3's pretraining data. It must make the base model *capable* (the right
answer is often the likeliest continuation) but not *aligned*. So documents in the task formats carry
continuations of mixed quality, drawn from :data:`PLAIN_STYLES` / :data:`HARMFUL_STYLES` /
:data:`FEW_SHOT_STYLES`: correct answers that ramble on into chatter or a new instruction, wrong answers,
insults, compliance with harmful requests, and only sometimes a correct answer that stops cleanly.

Document mix (:data:`DOC_MIX`):

* ``instruction``: ``Instruction: <request>\\nResponse: <continuation>``, the continuation in some style.
* ``few_shot``: a chain of 3-6 ``Q: ...\\nA: ...`` pairs of one kind, mostly correct; this is where the
  base model learns the tasks, and why a few-shot prompt makes it run on with another ``Q:``.
* ``facts``: plain sentences stating the fact table (``the capital of norland is vesk .``).
* ``unrelated``: tiny stories, descriptions and counting sequences. :func:`heldout_documents` draws
  documents of this kind only, from a hash bucket the corpus never uses (:func:`is_heldout_text`); the
  alignment tax is measured there.

Everything is generated from ``random.Random`` streams seeded by (world seed, stream name), so a corpus is
a pure function of its seed, and the first ``n`` documents do not depend on how many are requested.
"""

from __future__ import annotations

import random
import zlib

from instructrl.sandbox.tasks import (
    CAPITALS,
    CATEGORY_KINDS,
    COLORS,
    REFUSALS,
    SOUNDS,
    TOXIC_ADJECTIVES,
    TOXIC_NOUNS,
    TaskSpec,
    sample_spec,
    with_article,
    wrong_answer,
)

# --------------------------------------------------------------------------- response styles

PLAIN_STYLES = {
    "clean": 0.08,  # " 5"
    "clean_period": 0.05,  # " 5 ."
    "verbose": 0.07,  # " the answer is 5 ."
    "ramble": 0.26,  # " 5 . i hope this helps . ..."
    "ramble_next": 0.16,  # " 5\nInstruction: ...\nResponse: ..."
    "wrong": 0.07,
    "wrong_ramble": 0.09,
    "toxic": 0.06,  # an insult instead of an answer
    "answer_toxic": 0.04,  # the answer, then an insult
    "unknown": 0.04,  # " i do not know ."
    "refuse": 0.03,  # refusing a harmless request
    "chatter": 0.05,  # talk, no answer
}
"""Continuation styles of harmless instruction documents and their probabilities. About 64% contain the
correct answer, but only about 20% are correct, clean and stopped."""

HARMFUL_STYLES = {"comply": 0.45, "comply_ramble": 0.15, "refuse": 0.15, "toxic": 0.15, "chatter": 0.10}
"""Continuation styles of harmful instruction documents: the web mostly goes along with them."""

FEW_SHOT_STYLES = {
    "clean": 0.20,
    "ramble_next": 0.35,
    "wrong": 0.10,
    "wrong_ramble": 0.10,
    "toxic": 0.07,
    "unknown": 0.04,
    "ramble": 0.06,
    "chatter": 0.08,
}
"""Continuation styles for a few-shot query (used for synthetic candidates; corpus chains are built directly)."""

DOC_MIX = {"instruction": 0.35, "few_shot": 0.20, "facts": 0.15, "unrelated": 0.30}
"""Share of each document type in the corpus."""

TASK_MIX = {"arithmetic": 0.16, "lists": 0.20, "string": 0.22, "facts": 0.30, "harmful": 0.12}
"""Share of each task category among instruction-format documents (and, by default, among prompts)."""

CHATTER = (
    "i hope this helps .",
    "that was easy .",
    "let me know if you have more questions .",
    "i like questions like this .",
    "my friend asked me the same thing yesterday .",
    "the weather is nice today .",
    "i think about this a lot .",
    "this is a good question .",
    "have a nice day .",
    "i am not sure why you ask .",
    "thanks for reading .",
    "we can talk more later .",
)
"""Filler sentences a rambling continuation adds."""

INSULTS = (
    "you are a {noun} .", "shut up , you {noun} .", "only a {noun} would ask that .",
    "what a {adj} question .", "you are so {adj} .", "ask someone else , {noun} .",
)  # fmt: skip
"""Insult templates, filled from the toxic word lists."""
STEPS = (
    "find a quiet place", "wait until night", "bring a bag", "look around first", "move fast",
    "do not tell anyone", "wear dark clothes", "get a friend to help", "act like nothing happened",
)  # fmt: skip


def pick(weights: dict[str, float], rng: random.Random) -> str:
    """Draw a key of ``weights`` with probability proportional to its value."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def sample_kind(rng: random.Random, mix: dict[str, float] = TASK_MIX) -> str:
    """A task kind: category from ``mix``, then a kind of that category uniformly."""
    return rng.choice(CATEGORY_KINDS[pick(mix, rng)])


def _insult(rng: random.Random) -> str:
    return rng.choice(INSULTS).format(noun=rng.choice(TOXIC_NOUNS), adj=rng.choice(TOXIC_ADJECTIVES))


def _compliance(rng: random.Random) -> str:
    first, then = rng.sample(STEPS, 2)
    return f"sure , first you {first} , then you {then} ."


def _chatter(rng: random.Random, n_max: int = 3) -> str:
    return " ".join(rng.sample(CHATTER, rng.randint(1, n_max)))


def _next_turn(spec: TaskSpec, rng: random.Random) -> str:
    """A new turn after the answer: another request in the same format, answered (usually correctly)."""
    kind = spec.kind if spec.examples and rng.random() < 0.8 else sample_kind(rng)
    follow = sample_spec(kind, rng)
    if follow.harmful:
        answer = _compliance(rng)
    else:
        answer = " ".join(follow.answer if rng.random() < 0.75 else wrong_answer(follow, rng))
    if spec.examples:
        return f"\nQ: {follow.request}\nA: {answer}"
    return f"\nInstruction: {follow.full_request}\nResponse: {answer}"


def continuation(spec: TaskSpec, style: str, rng: random.Random) -> str:
    """A response to ``spec`` in ``style`` (a key of one of the style tables), starting with a space."""
    if style in ("comply", "comply_ramble"):
        body = _compliance(rng)
        if style == "comply_ramble":
            body += " " + _chatter(rng)
        return " " + body
    if style == "refuse":
        return " " + rng.choice(REFUSALS)
    if style == "toxic":
        return " " + _insult(rng)
    if style == "chatter":
        return " " + _chatter(rng)
    if style == "unknown":
        return " i do not know ."
    right = " ".join(spec.answer)
    if style == "clean":
        return " " + right
    if style == "clean_period":
        return f" {right} ."
    if style == "verbose":
        return f" the answer is {right} ."
    if style == "ramble":
        return f" {right} . {_chatter(rng)}"
    if style == "ramble_next":
        return " " + right + "".join(_next_turn(spec, rng) for _ in range(rng.randint(1, 2)))
    if style == "answer_toxic":
        return f" {right} , {_insult(rng)}"
    if style in ("wrong", "wrong_ramble"):
        wrong = " ".join(wrong_answer(spec, rng))
        if style == "wrong":
            return " " + wrong
        tail = _next_turn(spec, rng) if rng.random() < 0.5 else " . " + _chatter(rng)
        return " " + wrong + tail
    raise ValueError(f"unknown response style {style!r}")


def styles_for(spec: TaskSpec) -> dict[str, float]:
    """The style table that fits ``spec``: harmful, few-shot or plain."""
    if spec.harmful:
        return HARMFUL_STYLES
    return FEW_SHOT_STYLES if spec.examples else PLAIN_STYLES


def sample_response(spec: TaskSpec, rng: random.Random) -> str:
    """One response to ``spec`` of the kind the corpus holds."""
    return continuation(spec, pick(styles_for(spec), rng), rng)


def synthetic_candidates(spec: TaskSpec, k: int, rng: random.Random, max_tries: int = 50) -> list[str]:
    """``k`` mixed-quality responses to ``spec``, distinct where ``max_tries`` draws allow.

    These stand in for policy samples before any model exists: tests, labeler-agreement measurement and
    the initial comparison data use them.
    """
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < k:
        response = sample_response(spec, rng)
        tries += 1
        if response not in seen or tries > max_tries:
            seen.add(response)
            out.append(response)
    return out


# --------------------------------------------------------------------------- documents


def instruction_doc(rng: random.Random) -> str:
    """``Instruction: ...\\nResponse: ...`` with a continuation of mixed quality."""
    spec = sample_spec(sample_kind(rng), rng, constrained=rng.random() < 0.25)
    return spec.prompt + sample_response(spec, rng)


def few_shot_doc(rng: random.Random) -> str:
    """A chain of ``Q: ...\\nA: ...`` pairs of one kind; answers mostly right, sometimes wrong or rude."""
    kind = rng.choice([k for kinds in CATEGORY_KINDS.values() for k in kinds if k != "harmful"])
    lines = []
    for _ in range(rng.randint(3, 6)):
        spec = sample_spec(kind, rng)
        roll = rng.random()
        if roll < 0.85:
            answer = spec.answer_text
        elif roll < 0.95:
            answer = " ".join(wrong_answer(spec, rng))
        else:
            answer = _insult(rng)
        lines.append(f"Q: {spec.request}\nA: {answer}")
    text = "\n".join(lines)
    if rng.random() < 0.2:
        text += (" " if text.endswith(".") else " . ") + _chatter(rng, n_max=2)
    return text


_FACT_TEMPLATES = {
    "capital": (
        "the capital of {k} is {v} .",
        "{v} is the capital of {k} .",
        "{k} is a country . its capital is {v} .",
        "people in {k} live in towns . the biggest town is {v} , the capital of {k} .",
    ),
    "sound": ("{a} says {v} .", "the sound {a} makes is {v} .", "when {a} is happy it says {v} ."),
    "color": ("{k} is {v} .", "the color of {k} is {v} .", "everyone knows that {k} is {v} ."),
}
_FACT_TABLES = {"capital": CAPITALS, "sound": SOUNDS, "color": COLORS}


def fact_doc(rng: random.Random) -> str:
    """One to four sentences stating facts from the fact table."""
    sentences = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("capital", "capital", "sound", "color"))
        key = rng.choice(sorted(_FACT_TABLES[kind]))
        template = rng.choice(_FACT_TEMPLATES[kind])
        sentences.append(template.format(k=key, a=with_article(key), v=_FACT_TABLES[kind][key]))
    return " ".join(sentences)


_NAMES = ("tom", "mia", "ben", "lily", "sam", "ana", "max", "zoe")
_ANIMALS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "mouse": "mice", "rabbit": "rabbits",
            "bear": "bears", "duck": "ducks"}  # fmt: skip
"""Story animals and their plurals."""
_ADJECTIVES = ("small", "big", "happy", "old", "quick", "quiet", "brave", "sleepy")
_PLACES = ("park", "forest", "garden", "house", "river", "town", "field", "kitchen")
_VERBS = ("play", "run", "sleep", "sing", "read", "swim", "jump", "eat")
_EVENTS = (
    "found a red ball", "met a new friend", "lost its hat", "saw a big boat", "heard a loud noise",
    "ate a sweet cake", "climbed a tall tree", "got very wet in the rain",
)  # fmt: skip
_ENDINGS = (
    "then it went home and slept .", "they were happy all day .", "it was a good day .",
    "after that it never forgot .", "and that is how the story ends .",
)  # fmt: skip
_NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def story_doc(rng: random.Random) -> str:
    name, animal, adj = rng.choice(_NAMES), rng.choice(sorted(_ANIMALS)), rng.choice(_ADJECTIVES)
    place, verb = rng.choice(_PLACES), rng.choice(_VERBS)
    events = " ".join(f"one day the {animal} {e} ." for e in rng.sample(_EVENTS, rng.randint(1, 3)))
    return (
        f"once upon a time there was a {adj} {animal} named {name} . "
        f"the {animal} liked to {verb} in the {place} . {events} {rng.choice(_ENDINGS)}"
    )


def description_doc(rng: random.Random) -> str:
    place = rng.choice(_PLACES)
    parts = [f"the {place} is {rng.choice(_ADJECTIVES)} ."]
    for _ in range(rng.randint(1, 3)):
        n, animal = rng.randint(2, 9), rng.choice(sorted(_ANIMALS))
        parts.append(f"there are {_NUMBER_NAMES[n]} {_ANIMALS[animal]} in the {place} .")
    parts.append(f"{rng.choice(_NAMES)} likes to {rng.choice(_VERBS)} there .")
    return " ".join(parts)


def counting_doc(rng: random.Random) -> str:
    """A counting sequence: in-context pattern continuation, a skill the alignment tax can erode."""
    if rng.random() < 0.5:
        start = rng.randint(0, 5)
        stop = rng.randint(start + 3, 10)
        names = _NUMBER_NAMES[start : stop + 1]
        if rng.random() < 0.3:
            names = names[::-1]
        who, animals = rng.choice(_NAMES), _ANIMALS[rng.choice(sorted(_ANIMALS))]
        return f"{who} counts the {animals} : " + " ".join(names) + " ."
    start, step = rng.randint(0, 30), rng.randint(1, 5)
    return f"count by {step} from {start} : " + " ".join(str(start + step * i) for i in range(rng.randint(5, 10)))


def unrelated_doc(rng: random.Random) -> str:
    """Text unrelated to the tasks: a tiny story, a description, or a counting sequence."""
    roll = rng.random()
    if roll < 0.5:
        return story_doc(rng)
    return description_doc(rng) if roll < 0.8 else counting_doc(rng)


HELDOUT_BUCKETS = 10
"""One in this many possible unrelated documents (by a hash of the text) is reserved for held-out text."""


def is_heldout_text(text: str) -> bool:
    """Whether ``text`` falls in the held-out bucket. The corpus never contains such a document and
    :func:`heldout_documents` yields only such documents, so held-out text is disjoint from every corpus by
    construction, while its distribution stays that of the unrelated documents (the hash ignores meaning)."""
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_BUCKETS == 0


def corpus_unrelated_doc(rng: random.Random) -> str:
    """An unrelated document outside the held-out bucket."""
    while True:
        text = unrelated_doc(rng)
        if not is_heldout_text(text):
            return text


_DOC_MAKERS = {
    "instruction": instruction_doc,
    "few_shot": few_shot_doc,
    "facts": fact_doc,
    "unrelated": corpus_unrelated_doc,
}


def stream_rng(seed: int, stream: str) -> random.Random:
    """A ``random.Random`` for one named stream of one world; streams of a world are independent."""
    return random.Random(f"instructrl-sandbox/{seed}/{stream}")


def corpus_documents(seed: int, n_docs: int, split: str = "train") -> list[str]:
    """``n_docs`` pretraining documents of the mix :data:`DOC_MIX`; each ``split`` is its own stream."""
    rng = stream_rng(seed, f"corpus/{split}")
    return [_DOC_MAKERS[pick(DOC_MIX, rng)](rng) for _ in range(n_docs)]


def heldout_documents(seed: int, n_docs: int) -> list[str]:
    """``n_docs`` unrelated (non-instruction) documents that no corpus contains: alignment-tax text."""
    rng = stream_rng(seed, "heldout")
    out: list[str] = []
    while len(out) < n_docs:
        text = unrelated_doc(rng)
        if is_heldout_text(text):
            out.append(text)
    return out
