"""The world protocol: what the RLHF pipeline may ask of "the people" around it.

InstructGPT's pipeline touches humans in four places: customers write prompts, labelers write
demonstrations (SFT data), labelers rank K sampled responses (reward-model data), and people judge the
final models (evaluation). :class:`World` is that interface. The pipeline only ever sees prompts,
demonstrations and rankings; the gold judgement is used for evaluation and analysis, never for training.

Plugging in your own world
    Implement the six methods of :class:`World` (structural typing: no base class needed) and give every
    command ``--set run.world=path/to/file.py:factory`` (or ``package.module:factory``; ``instructrl demo --set
    world=...`` passes it to every stage), where ``factory(seed)`` returns your world (:func:`load_world`).

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
    * ``pretraining_corpus(n_docs, split)`` returns ``n_docs`` documents of "web" text (``split`` "train", or
      "valid" for held-out documents of the same mix): the base model's pretraining data and PPO-ptx's.

    Optional extras (:data:`OPTIONAL_EXTRAS`: ``reference_response``, ``heldout_text``, ``analysis``,
    ``synthetic_candidates``) unlock more rows of the evaluation report; without them those rows say what they
    need. A worked example that is not the sandbox: ``examples/shop_world.py``.

    ``rng`` arguments are ``numpy.random.Generator`` objects owned by the caller; a world draws from them
    and nothing else, so a run is reproducible from its seeds.

    Inter-labeler agreement of any world's rankings is measured by :mod:`instructrl.agreement`.

Implementations
    :class:`instructrl.sandbox.SandboxWorld` (``run.world=sandbox``, the default) is a miniature InstructGPT world
    (tiny tasks with programmatic truth, simulated labelers) that runs the whole method on one CPU in minutes;
    ``examples/shop_world.py`` is the template for your own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from instructrl.data.records import Demonstration
from instructrl.errors import UserFacingError
from instructrl.utils.imports import import_callable

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

    def pretraining_corpus(self, n_docs: int, split: str = "train") -> list[str]:
        """``n_docs`` documents of the world's "web" text (``"train"``; ``"valid"``: held-out documents of the same
        mix) on which the base model is pretrained and PPO-ptx's pretraining term is computed."""
        ...


PROTOCOL_METHODS = ("tasks", "demonstrate", "rank", "gold_score", "labelers", "pretraining_corpus")
"""The methods every world has (:class:`World`)."""

OPTIONAL_EXTRAS = {
    "reference_response": "reference_response(task) -> str: the ideal response; unlocks the reference ceiling row",
    "heldout_text": "heldout_text(n) -> list[str]: non-instruction text; unlocks the alignment-tax row (3)",
    "analysis": "analysis(task, response) -> dict of the sandbox's behaviour flags (correct, refused, complied, "
    "toxic, stated_wrong_fact, followed_format); unlocks the behaviour table and row 5",
    "synthetic_candidates": "synthetic_candidates(task, k, rng) -> list[str]: mixed-quality responses; without it "
    "'sandbox make'-style comparisons and agreement use K labelers' demonstrations",
}
"""Methods a world may add beyond :class:`World`, each unlocking more of the pipeline or the report."""

DEFAULT_WORLD = "sandbox"
"""The world every stage uses unless ``run.world`` names another: :class:`instructrl.sandbox.SandboxWorld`."""
SANDBOX_FACTORY = "instructrl.sandbox.world:SandboxWorld"
"""What ``"sandbox"`` stands for (imported by name: the protocol module does not depend on its implementations)."""


def has_extra(world: object, name: str) -> bool:
    """Whether ``world`` provides the optional extra ``name`` (one of :data:`OPTIONAL_EXTRAS`)."""
    return callable(getattr(world, name, None))


class WorldError(UserFacingError, ValueError):
    """A world spec that names no world, or an object that is not one; the message names the setting."""


def check_world_spec(spec: str, setting: str = "run.world") -> tuple[str, str]:
    """``(module or file, factory name)`` of a world spec other than "sandbox", checked without importing it."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr.isidentifier():
        raise WorldError(
            f"{setting}: {spec!r} is not a world; expected 'sandbox', 'path/to/file.py:factory' or "
            "'package.module:factory' (factory(seed) returns the world)"
        )
    if module_part.endswith(".py") and not Path(module_part).is_file():
        raise WorldError(f"{setting}: {spec!r}: no such file {module_part}")
    return module_part, attr


def _resolve_factory(spec: str, setting: str):
    """The callable named by ``spec`` ("path/to/file.py:name" or "package.module:name")."""
    module_part, attr = check_world_spec(spec, setting)
    return import_callable(module_part, attr, f"{setting}: {spec!r}", WorldError)


def load_world(spec: str = DEFAULT_WORLD, seed: int = 0, setting: str = "run.world") -> World:
    """The world named by ``spec``, built with ``seed``: ``"sandbox"`` (:class:`~instructrl.sandbox.SandboxWorld`),
    ``"path/to/file.py:factory"`` or ``"package.module:factory"`` where ``factory(seed)`` returns an object with
    the methods of :class:`World`. A wrong spec, or an object lacking a protocol method, raises
    :class:`WorldError` naming ``setting``."""
    world = _resolve_factory(SANDBOX_FACTORY if spec == DEFAULT_WORLD else spec, setting)(seed)
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(world, name, None))]
    if missing:
        raise WorldError(
            f"{setting}: {spec!r} returned a {type(world).__name__}, which lacks the World method(s) "
            f"{', '.join(missing)} (see instructrl.world.World)"
        )
    return world


def describe_world(spec: str, seed: int) -> str:
    """How a data-source log line names a world: ``sandbox world (seed 0)`` or ``world file.py:make (seed 0)``."""
    return f"sandbox world (seed {seed})" if spec == DEFAULT_WORLD else f"world {spec} (seed {seed})"


STAGE_SHARES = {"sft": 0.4, "rm": 0.35, "ppo": 0.25}
"""Fraction of a world's train-split tasks in each stage's pool (InstructGPT drew separate prompt sets for SFT,
RM and PPO, Table 6)."""


def _unit(task_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stage_tasks(world: World, stage: str, seed: int | None = None) -> list[Task]:
    """The train-split tasks of one stage's pool ('sft', 'rm' or 'ppo'), in the world's fixed order: tasks are
    assigned by a hash of their id and ``seed`` (default: the world's ``seed`` attribute, else 0), so the reward
    model is trained on prompts the SFT model never saw and PPO optimizes on prompts neither saw."""
    if stage not in STAGE_SHARES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_SHARES)}")
    seed = getattr(world, "seed", 0) if seed is None else seed
    names = list(STAGE_SHARES)
    low = sum(STAGE_SHARES[name] for name in names[: names.index(stage)])
    high = low + STAGE_SHARES[stage]
    return [t for t in world.tasks("train") if low <= _unit(t.id, seed) < high]


def world_demonstrations(world: World, n: int, seed: int) -> list[Demonstration]:
    """``n`` labeler-written demonstrations on the world's SFT pool (cycling the pool if ``n`` exceeds it), the
    labelers taking turns; ``seed`` seeds the labelers' randomness."""
    pool = stage_tasks(world, "sft")
    if not pool and n:
        raise ValueError(f"{type(world).__name__} has no train-split tasks in its SFT pool to demonstrate")
    labelers = world.labelers()
    rng = np.random.default_rng([seed, 1])
    demos = []
    for i in range(n):
        task = pool[i % len(pool)]
        labeler = labelers[i % len(labelers)]
        response = world.demonstrate(task, labeler, rng)
        meta = {"labeler_id": str(labeler), "category": task.category, "type": task.type, "id": task.id}
        demos.append(Demonstration(prompt=task.prompt, response=response, meta=meta))
    return demos
