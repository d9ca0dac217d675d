"""The sandbox's training data per InstructGPT stage, as the pipeline's own record types.

InstructGPT drew separate prompt sets for SFT, RM and PPO (Table 6). Here the sandbox's train-split tasks
are partitioned deterministically into three pools by task id (``STAGE_SHARES``), so the reward model is
trained on prompts the SFT model never saw, and PPO optimizes on prompts neither saw. Valid and test
splits (by user) are untouched: evaluation uses ``world.tasks("test")``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from instructrl.data.records import Demonstration, PromptRecord
from instructrl.sandbox.world import SandboxWorld
from instructrl.world import Task

STAGE_SHARES = {"sft": 0.4, "rm": 0.35, "ppo": 0.25}
"""Fraction of train-split tasks in each stage's pool."""


def _unit(task_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stage_tasks(world: SandboxWorld, stage: str) -> list[Task]:
    """The train-split tasks of one stage's pool ('sft', 'rm' or 'ppo'), in the world's fixed order."""
    if stage not in STAGE_SHARES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_SHARES)}")
    names = list(STAGE_SHARES)
    low = sum(STAGE_SHARES[name] for name in names[: names.index(stage)])
    high = low + STAGE_SHARES[stage]
    return [t for t in world.tasks("train") if low <= _unit(t.id, world.seed) < high]


def sandbox_demonstrations(seed: int, n: int, world: SandboxWorld | None = None) -> list[Demonstration]:
    """``n`` labeler-written demonstrations on the SFT pool (cycling the pool if n exceeds it)."""
    world = world or SandboxWorld(seed=seed)
    pool = stage_tasks(world, "sft")
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


def sandbox_prompts(seed: int, stage: str = "ppo", world: SandboxWorld | None = None) -> list[PromptRecord]:
    """Prompts of one stage's pool as :class:`PromptRecord` (user ids kept)."""
    world = world or SandboxWorld(seed=seed)
    return [
        PromptRecord(t.prompt, t.user_id, {"category": t.category, "type": t.type, "id": t.id})
        for t in stage_tasks(world, stage)
    ]


def sandbox_pretraining_texts(seed: int, n: int, world: SandboxWorld | None = None) -> list[str]:
    """``n`` documents of the sandbox's pretraining corpus (the same stream the base model trained on)."""
    world = world or SandboxWorld(seed=seed)
    return world.pretraining_corpus(n, split="train")
