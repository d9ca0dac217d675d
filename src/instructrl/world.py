"""The world protocol: what the RLHF pipeline may ask of "the people" around it.

InstructGPT's pipeline touches humans in four places: customers write prompts, labelers write
demonstrations (SFT data), labelers rank K sampled responses (reward-model data), and people judge the
final models (evaluation). :class:`World` is that interface. The pipeline only ever sees prompts,
demonstrations and rankings; the gold judgement is used for evaluation and analysis, never for training.

Plugging in your own world
    Implement the five methods of :class:`World` (structural typing: no base class needed):

    * ``tasks(split)`` returns the prompts of ``"train"``, ``"valid"`` or ``"test"`` (:data:`SPLITS`) as
      :class:`Task` objects, split by user id so that one user's prompts never straddle splits
      (InstructGPT §3.2).
    * ``demonstrate(task, labeler, rng)`` returns the response labeler ``labeler`` would write. Responses
      start with a space (``" 6"``) and carry no EOS; the tokenizer adds it.
    * ``rank(task, responses, labeler, rng)`` returns a :data:`Ranking` of ``responses``: indices best first;
      a tuple element is a group of tied responses. Flattened, it is a permutation of ``range(len(responses))``.
    * ``gold_score(task, response)`` is the hidden judgement (higher is better) used by evaluation only.
      Pass the full generated text: a response whose model never emitted EOS is usually long, and a
      good judgement penalises that.
    * ``labelers()`` lists labeler ids.

    ``rng`` arguments are ``numpy.random.Generator`` objects owned by the caller; a world draws from them
    and nothing else, so a run is reproducible from its seeds.

    Inter-labeler agreement of any world's rankings is measured by :mod:`instructrl.agreement`.

Implementations
    :class:`instructrl.sandbox.SandboxWorld` is a miniature InstructGPT world (tiny tasks with programmatic
    truth, simulated labelers) that runs the whole method on one CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "valid", "test")
"""The prompt splits a world serves; one user's prompts are all in one of them."""

Ranking = tuple[int | tuple[int, ...], ...]
"""Response indices best first; a tuple element is a group of tied responses."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One instruction prompt. Its ground truth stays inside the world that made it."""

    id: str
    """Unique within its world."""
    prompt: str
    """The full prompt text the policy sees, e.g. ``"Instruction: what is 7 minus 2 ?\\nResponse:"``."""
    category: str
    """Task category (sandbox: arithmetic, lists, string, facts, harmful)."""
    type: str
    """``"plain"`` (an instruction) or ``"few-shot"`` (worked examples followed by the query)."""
    user_id: str
    """Who wrote the prompt; splits are made by user id."""
    split: str
    """``"train"``, ``"valid"`` or ``"test"``."""


@runtime_checkable
class World(Protocol):
    """Everything the RLHF pipeline may ask of the people around it (see the module docstring)."""

    def tasks(self, split: str) -> list[Task]:
        """Prompts of one split (``"train"``, ``"valid"``, ``"test"``), in a fixed order."""
        ...

    def demonstrate(self, task: Task, labeler: int, rng: np.random.Generator) -> str:
        """The response labeler ``labeler`` writes for ``task`` (starts with a space, no EOS)."""
        ...

    def rank(self, task: Task, responses: Sequence[str], labeler: int, rng: np.random.Generator) -> Ranking:
        """Labeler ``labeler``'s ranking of ``responses``: indices best first, tuples are tie groups."""
        ...

    def gold_score(self, task: Task, response: str) -> float:
        """The hidden judgement of ``response`` (higher is better); for evaluation only."""
        ...

    def labelers(self) -> list[int]:
        """Labeler ids accepted by ``demonstrate`` and ``rank``."""
        ...
