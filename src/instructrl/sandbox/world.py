"""The sandbox world: a miniature InstructGPT world that implements :class:`instructrl.world.World`.

:class:`SandboxWorld` runs on one CPU in minutes: a tiny word-level task language
(:mod:`~instructrl.sandbox.tasks`), a "web" corpus to pretrain a base model on
(:mod:`~instructrl.sandbox.corpus`), simulated labelers (:mod:`~instructrl.sandbox.labelers`) and a hidden
gold judgement with programmatic truth. Besides the protocol's five methods it offers extras that only a
world with ground truth can: the hidden spec of a task, behaviour flags of a response, reference responses,
synthetic candidates, a pretraining corpus and held-out text.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from instructrl.sandbox import corpus, labelers, tasks
from instructrl.sandbox.tasks import TaskSpec
from instructrl.world import SPLITS, Ranking, Task


def _dirichlet(rng: random.Random, alphas: Sequence[float]) -> list[float]:
    draws = [rng.gammavariate(a, 1.0) for a in alphas]
    total = sum(draws)
    return [d / total for d in draws]


class SandboxWorld:
    """A miniature InstructGPT world: tiny tasks with programmatic truth, a web corpus, simulated labelers.

    Users each write a handful of prompts (at most ``max_prompts_per_user``, as InstructGPT capped at 200)
    with their own mix of categories and their own taste for few-shot prompts; users are shuffled into
    train / valid / test by ``split_fractions``. Everything is a pure function of ``seed``.
    """

    def __init__(
        self,
        seed: int = 0,
        n_users: int = 400,
        prompts_per_user: float = 15.0,
        max_prompts_per_user: int = 200,
        n_labelers: int = 8,
        task_mix: dict[str, float] | None = None,
        fewshot_fraction: float = 0.25,
        constraint_fraction: float = 0.3,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        labeler_noise: float = labelers.DEFAULT_NOISE,
        tie_threshold: float = labelers.DEFAULT_TIE_THRESHOLD,
    ):
        """
        Args:
            seed: the world's seed; tasks, corpus and labelers follow from it.
            n_users: number of prompt writers (at least 3, so every split has one).
            prompts_per_user: mean prompts per user (geometric-like, heavy users exist).
            max_prompts_per_user: cap on prompts per user.
            n_labelers: number of simulated labelers (at least 2).
            task_mix: probability of each category; default :data:`corpus.TASK_MIX` (12% harmful).
            fewshot_fraction: mean share of few-shot prompts among harmless prompts.
            constraint_fraction: share of plain prompts that state a format constraint (when the kind has one).
            split_fractions: fractions of users in train, valid, test.
            labeler_noise: base noise scale σ of labeler utilities (sets inter-labeler agreement).
            tie_threshold: utilities closer than this are ranked as ties.
        """
        mix = dict(corpus.TASK_MIX if task_mix is None else task_mix)
        unknown = set(mix) - set(tasks.CATEGORIES)
        if unknown:
            raise ValueError(f"task_mix: unknown categories {sorted(unknown)}; known: {list(tasks.CATEGORIES)}")
        if n_users < 3:
            raise ValueError(f"n_users must be >= 3 so that every split has a user, got {n_users}")
        if n_labelers < 2:
            raise ValueError(f"n_labelers must be >= 2, got {n_labelers}")
        if len(split_fractions) != 3 or min(split_fractions) <= 0:
            raise ValueError(f"split_fractions must be three positive numbers, got {split_fractions}")
        self.seed = seed
        self._labelers = labelers.make_labelers(seed, n_labelers, labeler_noise, tie_threshold)
        self._tasks: list[Task] = []
        self._specs: dict[str, TaskSpec] = {}
        self._by_prompt: dict[str, Task] = {}
        self._build_tasks(
            n_users,
            prompts_per_user,
            max_prompts_per_user,
            mix,
            fewshot_fraction,
            constraint_fraction,
            split_fractions,
        )

    # ----------------------------------------------------------------------- construction

    @staticmethod
    def _user_splits(rng: random.Random, n_users: int, fractions: tuple[float, float, float]) -> list[str]:
        total = sum(fractions)
        n_valid = max(1, round(n_users * fractions[1] / total))
        n_test = max(1, round(n_users * fractions[2] / total))
        n_train = n_users - n_valid - n_test
        splits = ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test
        rng.shuffle(splits)
        return splits

    def _build_tasks(
        self,
        n_users: int,
        prompts_per_user: float,
        max_per_user: int,
        mix: dict[str, float],
        fewshot_fraction: float,
        constraint_fraction: float,
        split_fractions: tuple[float, float, float],
    ) -> None:
        rng = corpus.stream_rng(self.seed, "users")
        categories = list(mix)
        splits = self._user_splits(rng, n_users, split_fractions)
        for user_index, split in enumerate(splits):
            user_id = f"user{user_index:04d}"
            n_prompts = min(max_per_user, 1 + int(rng.expovariate(1.0 / max(prompts_per_user - 1.0, 1e-9))))
            # Each user has their own interests (Dirichlet around the global mix) and few-shot habit.
            weights = dict(zip(categories, _dirichlet(rng, [4.0 * mix[c] for c in categories])))
            fewshot_p = (
                rng.betavariate(1.5, 1.5 * (1 - fewshot_fraction) / fewshot_fraction) if fewshot_fraction else 0
            )
            for _ in range(n_prompts):
                kind = corpus.sample_kind(rng, weights)
                few_shot = kind != "harmful" and rng.random() < fewshot_p
                spec = tasks.sample_spec(
                    kind,
                    rng,
                    n_examples=rng.randint(2, 3) if few_shot else 0,
                    constrained=rng.random() < constraint_fraction,
                )
                task = Task(f"t{len(self._tasks):06d}", spec.prompt, spec.category, spec.type, user_id, split)
                self._tasks.append(task)
                self._specs[task.id] = spec
                self._by_prompt.setdefault(task.prompt, task)

    # ----------------------------------------------------------------------- the World protocol

    def tasks(self, split: str) -> list[Task]:
        """Prompts of ``split`` (``"train"``, ``"valid"``, ``"test"``, or ``"all"``), in a fixed order."""
        if split == "all":
            return list(self._tasks)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
        return [t for t in self._tasks if t.split == split]

    def demonstrate(self, task: Task, labeler: int, rng: np.random.Generator) -> str:
        return labelers.demonstrate(self.spec(task), self._profile(labeler), labelers.as_random(rng))

    def rank(self, task: Task, responses: Sequence[str], labeler: int, rng: np.random.Generator) -> Ranking:
        return labelers.rank(self.spec(task), responses, self._profile(labeler), labelers.as_generator(rng))

    def gold_score(self, task: Task, response: str) -> float:
        """Hidden judgement in about [−1.2, 1.1]: helpful, honest, harmless, concise, format (see ``tasks``)."""
        return tasks.gold_score(self.spec(task), response)

    def labelers(self) -> list[int]:
        return [p.labeler_id for p in self._labelers]

    # ----------------------------------------------------------------------- sandbox extras

    def spec(self, task: Task) -> TaskSpec:
        """The hidden spec (ground truth) of ``task``: looked up by id, else by prompt text."""
        spec = self._specs.get(task.id)
        if spec is not None and spec.prompt == task.prompt:
            return spec
        known = self._by_prompt.get(task.prompt)
        if known is None:
            raise KeyError(f"task {task.id!r} is not a prompt of this sandbox world (seed {self.seed})")
        return self._specs[known.id]

    def task_by_prompt(self, prompt: str) -> Task:
        """The (first) task whose prompt is exactly ``prompt``; identical prompts share their ground truth."""
        task = self._by_prompt.get(prompt)
        if task is None:
            raise KeyError(f"no task of this sandbox world (seed {self.seed}) has the prompt {prompt[:80]!r}")
        return task

    def analysis(self, task: Task, response: str) -> dict[str, Any]:
        """Behaviour flags of ``response``: correct, refused, toxic, stated_wrong_fact, followed_format, stopped,
        plus complied, unknown, continued, extra_words and the stated answer (None if none)."""
        a = tasks.analyze(self.spec(task), response)
        flags = dataclasses.asdict(a)
        flags["stated_answer"] = " ".join(flags.pop("stated")) if a.stated is not None else None
        flags["stopped"] = a.stopped
        return flags

    def reference_response(self, task: Task) -> str:
        """The ideal response: the bare correct answer, or a short refusal for a harmful request."""
        spec = self.spec(task)
        return " " + (tasks.REFUSALS[0] if spec.harmful else spec.answer_text)

    def synthetic_candidates(self, task: Task, k: int, rng: np.random.Generator) -> list[str]:
        """``k`` mixed-quality responses like the corpus holds (distinct when possible), for tests and agreement."""
        return corpus.synthetic_candidates(self.spec(task), k, labelers.as_random(rng))

    def pretraining_corpus(self, n_docs: int, split: str = "train") -> list[str]:
        """``n_docs`` web documents (task formats of mixed quality, facts, unrelated text); each split is its
        own stream, so ``"valid"`` gives held-out documents of the same mix."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return corpus.corpus_documents(self.seed, n_docs, split)

    def heldout_text(self, n: int) -> list[str]:
        """``n`` non-instruction documents (stories, descriptions, counting) outside the corpus stream: the text on
        which the alignment tax (held-out perplexity of the tuned policy) is measured."""
        return corpus.heldout_documents(self.seed, n)

    def labeler_profile(self, labeler: int) -> labelers.LabelerProfile:
        """Preferences, noise and habits of one simulated labeler."""
        return self._profile(labeler)

    def _profile(self, labeler: int) -> labelers.LabelerProfile:
        if not 0 <= labeler < len(self._labelers):
            raise ValueError(f"unknown labeler {labeler}; this world has labelers 0..{len(self._labelers) - 1}")
        return self._labelers[labeler]
