"""Write a world's data to a folder: corpus, held-out text, prompts, demonstrations, comparisons.

The world is the sandbox unless ``world`` names another (``path/to/file.py:factory``, see
:func:`instructrl.world.load_world`); ``n_users`` and ``n_labelers`` size the sandbox only.

Files written to ``output_dir`` (each atomically):

* ``corpus.jsonl`` / ``corpus_valid.jsonl``: ``{text}`` pretraining documents (train stream / held-out stream
  of the same mix, for the base model's validation perplexity).
* ``heldout.jsonl``: ``{text}`` non-instruction documents on which the alignment tax is measured (only for a
  world with the ``heldout_text`` extra).
* ``prompts.jsonl``: ``{prompt, user_id, category, type, id, split, stage}`` for every prompt. Train prompts are
  partitioned into ``stage`` ``"sft"`` (demonstrated), ``"rm"`` (ranked) and ``"ppo"`` (left for RL), as
  InstructGPT's three datasets were distinct; valid and test prompts have ``stage`` null.
* ``demonstrations.jsonl``: ``{prompt, response, labeler_id, id, category, type, user_id, split}`` for the
  SFT train prompts and every valid prompt.
* ``comparisons.jsonl``: ``{prompt, responses, ranking, labeler_id, id, category, type, user_id, split}`` for the
  RM train prompts and every valid prompt: K = ``min_k``..``max_k`` synthetic candidates (a world without the
  ``synthetic_candidates`` extra: K labelers' demonstrations) ranked by one labeler (ranking best first, nested
  lists are ties). The RM stage ranks samples of the SFT policy instead (the InstructGPT protocol); these are
  for users who want a fixed comparisons file.
* ``agreement.json``: inter-labeler agreement on those candidates (paper: 72.6 ± 1.5%).
* ``instructrl_sandbox.yaml``: the resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instructrl.config import require, require_positive, require_world, save_config
from instructrl.sandbox.labelers import pairwise_agreement
from instructrl.sandbox.world import SandboxWorld
from instructrl.utils.io import atomic_write_json, atomic_write_jsonl
from instructrl.world import (
    DEFAULT_WORLD,
    SPLITS,
    STAGE_SHARES,
    Task,
    World,
    describe_world,
    has_extra,
    load_world,
    stage_tasks,
)

PAPER_AGREEMENT = (0.726, 0.015)
"""InstructGPT training labelers' agreement with each other, mean and ± (Ouyang et al. 2022, §5.2)."""


@dataclass
class Config:
    """A world's data files (the sandbox's by default)."""

    output_dir: str = "runs/sandbox/data"
    """Folder the files are written to."""
    world: str = DEFAULT_WORLD
    """'sandbox', 'path/to/file.py:factory' or 'package.module:factory' (``instructrl.world.load_world``)."""
    seed: int = 0
    """Seed of the world; every file is a pure function of it and the sizes below."""
    n_users: int = 400
    """Sandbox only: number of prompt writers (prompts are split into train / valid / test by user)."""
    n_labelers: int = 8
    """Sandbox only: number of simulated labelers."""
    corpus_docs: int = 30000
    """Pretraining documents in corpus.jsonl (30,000 is about 1M words)."""
    corpus_valid_docs: int = 1000
    """Documents in corpus_valid.jsonl (same mix, separate stream)."""
    heldout_docs: int = 1000
    """Non-instruction documents in heldout.jsonl (alignment tax)."""
    sft_prompts: int = 2000
    """Train prompts given a demonstration (fewer if the train split is smaller)."""
    rm_prompts: int = 1500
    """Train prompts given a ranked comparison (fewer if the train split runs out after the SFT ones)."""
    min_k: int = 4
    """Fewest responses per comparison (InstructGPT: 4)."""
    max_k: int = 9
    """Most responses per comparison (InstructGPT: 9)."""
    agreement_prompts: int = 400
    """Train prompts on which inter-labeler agreement is measured."""

    def validate(self) -> None:
        require_positive(self, "n_users", "corpus_docs", "corpus_valid_docs", "heldout_docs", "agreement_prompts")
        require(self.n_users >= 3, "n_users", f"must be >= 3 so that every split has a user, got {self.n_users}")
        require(self.n_labelers >= 2, "n_labelers", f"must be >= 2, got {self.n_labelers}")
        require(self.sft_prompts >= 0, "sft_prompts", f"must be >= 0, got {self.sft_prompts}")
        require(self.rm_prompts >= 0, "rm_prompts", f"must be >= 0, got {self.rm_prompts}")
        require(self.min_k >= 2, "min_k", f"must be >= 2, got {self.min_k}")
        require(self.max_k >= self.min_k, "max_k", f"must be >= min_k={self.min_k}, got {self.max_k}")
        require_world(self.world, "world")


def _task_fields(task: Task) -> dict[str, Any]:
    return {"id": task.id, "category": task.category, "type": task.type, "user_id": task.user_id, "split": task.split}


def assign_stages(world: World) -> dict[str, str]:
    """``{task id: stage}`` for the train prompts: the same disjoint sft / rm / ppo pools every stage uses."""
    return {t.id: stage for stage in STAGE_SHARES for t in stage_tasks(world, stage)}


def demonstration_records(world: World, tasks: list[Task], rng: np.random.Generator) -> list[dict]:
    """One demonstration per task, each by a labeler drawn at random."""
    labelers = world.labelers()
    records = []
    for task in tasks:
        labeler = labelers[int(rng.integers(len(labelers)))]
        response = world.demonstrate(task, labeler, rng)
        records.append({"prompt": task.prompt, "response": response, "labeler_id": labeler, **_task_fields(task)})
    return records


def candidates(world: World, task: Task, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` responses of mixed quality to rank: the world's ``synthetic_candidates``, else the demonstrations of
    ``k`` labelers drawn at random (labelers with different habits write different responses)."""
    if has_extra(world, "synthetic_candidates"):
        return world.synthetic_candidates(task, k, rng)
    labelers = world.labelers()
    return [world.demonstrate(task, labelers[int(rng.integers(len(labelers)))], rng) for _ in range(k)]


def comparison_records(
    world: World, tasks: list[Task], min_k: int, max_k: int, rng: np.random.Generator
) -> list[dict]:
    """One K-wise comparison of :func:`candidates` per task, ranked by a labeler drawn at random."""
    labelers = world.labelers()
    records = []
    for task in tasks:
        k = int(rng.integers(min_k, max_k + 1))
        responses = candidates(world, task, k, rng)
        labeler = labelers[int(rng.integers(len(labelers)))]
        ranking = [list(e) if isinstance(e, tuple) else e for e in world.rank(task, responses, labeler, rng)]
        records.append(
            {"prompt": task.prompt, "responses": responses, "ranking": ranking, "labeler_id": labeler}
            | _task_fields(task)
        )
    return records


def run(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "instructrl_sandbox.yaml")
    if cfg.world == DEFAULT_WORLD:
        world = SandboxWorld(seed=cfg.seed, n_users=cfg.n_users, n_labelers=cfg.n_labelers)
    else:
        world = load_world(cfg.world, cfg.seed, setting="world")
    rng = np.random.default_rng(cfg.seed)

    n_corpus = atomic_write_jsonl(
        out / "corpus.jsonl", ({"text": t} for t in world.pretraining_corpus(cfg.corpus_docs))
    )
    atomic_write_jsonl(
        out / "corpus_valid.jsonl", ({"text": t} for t in world.pretraining_corpus(cfg.corpus_valid_docs, "valid"))
    )
    if has_extra(world, "heldout_text"):
        atomic_write_jsonl(out / "heldout.jsonl", ({"text": t} for t in world.heldout_text(cfg.heldout_docs)))

    train, valid = world.tasks("train"), world.tasks("valid")
    stages = assign_stages(world)
    atomic_write_jsonl(
        out / "prompts.jsonl",
        ({"prompt": t.prompt, **_task_fields(t), "stage": stages.get(t.id)} for s in SPLITS for t in world.tasks(s)),
    )
    sft_tasks = [t for t in train if stages[t.id] == "sft"][: cfg.sft_prompts] + valid
    rm_tasks = [t for t in train if stages[t.id] == "rm"][: cfg.rm_prompts] + valid
    n_demos = atomic_write_jsonl(out / "demonstrations.jsonl", demonstration_records(world, sft_tasks, rng))
    n_comparisons = atomic_write_jsonl(
        out / "comparisons.jsonl", comparison_records(world, rm_tasks, cfg.min_k, cfg.max_k, rng)
    )

    agreement_tasks = train[: cfg.agreement_prompts]
    shown = [candidates(world, t, int(rng.integers(cfg.min_k, cfg.max_k + 1)), rng) for t in agreement_tasks]
    mean, stderr, per_pair = pairwise_agreement(world, agreement_tasks, shown, rng)
    agreement = {
        "mean": mean,
        "stderr": stderr,
        "n_prompts": len(agreement_tasks),
        "k_range": [cfg.min_k, cfg.max_k],
        "per_labeler_pair": {f"{a}-{b}": v for (a, b), v in per_pair.items()},
        "paper": {"mean": PAPER_AGREEMENT[0], "stderr": PAPER_AGREEMENT[1]},
    }
    atomic_write_json(out / "agreement.json", agreement)

    summary = {
        "output_dir": str(out),
        "corpus_docs": n_corpus,
        "prompts": {split: len(world.tasks(split)) for split in ("train", "valid", "test")},
        "demonstrations": n_demos,
        "comparisons": n_comparisons,
        "agreement": mean,
        "agreement_stderr": stderr,
    }
    atomic_write_json(out / "results.json", summary)  # written last: marks the folder complete
    n_prompts = sum(summary["prompts"].values())
    print(
        f"{describe_world(cfg.world, cfg.seed)}: wrote {n_corpus} corpus docs, {n_prompts} prompts, "
        f"{n_demos} demonstrations, {n_comparisons} comparisons to {out}; "
        f"labeler agreement {100 * mean:.1f} ± {100 * stderr:.1f}% "
        f"(paper {100 * PAPER_AGREEMENT[0]:.1f} ± {100 * PAPER_AGREEMENT[1]:.1f}%)",
        flush=True,
    )
    return summary
