"""The frame every training stage shares around its loop: output folder, seeds, resume, metrics, checkpoints.

A stage reads as ``Config`` → build → loop → save::

    stage = TrainingRun.start(cfg, "sft")                   # output_dir + saved config, threads, seed, checkpoint
    ... build the data and the model ...
    state = TrainingState.adam_cosine(model, cfg, total_steps, cfg.warmup_steps, stage.runtime)
    saved = stage.restore(state)                            # the newest checkpoint's entries, or None
    training_model = state.prepare()                        # DDP-wrapped under N processes
    with stage.metrics_writer() as metrics, stage.progress(total_steps) as bar:  # closed on errors too
        for step in range(stage.start_step, total_steps):
            ...
            if stage.checkpoint_due(step + 1, total_steps):
                stage.save_checkpoint(step + 1, state)
    ... save the model
    return stage.finish(results, f"sft: ...; saved to {stage.out}")

The checkpoint holds the config's :func:`~instructrl.config.resume_fingerprint`; :meth:`TrainingRun.start`
refuses (before anything is built) a checkpoint made with settings that would change the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from instructrl.config import RunSettings, check_resume_compatible, resume_fingerprint, save_config, to_dict
from instructrl.stages.common import cosine_lr_factor, make_adam, progress, set_threads
from instructrl.utils.checkpoint import load_latest_checkpoint
from instructrl.utils.device import resolve_device
from instructrl.utils.distributed import Runtime, get_runtime
from instructrl.utils.guards import NonFiniteGuard
from instructrl.utils.io import atomic_write_json
from instructrl.utils.seed import rng_state, set_rng_state
from instructrl.utils.trackers import flat_hyperparameters, start_trackers


@dataclass
class TrainingSettings:
    """The settings of a stage trained by a :meth:`TrainingState.adam_cosine` loop, besides its own ``lr`` and
    warmup: the optimizer's and the schedule's, the gradient clip and the run block. The pretrain, sft and rm
    configs derive from it, so these keys stay top-level (``--set betas=[0.9,0.99]``)."""

    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak LR (paper: 10%)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2 (paper: 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    run: RunSettings = field(default_factory=RunSettings)
    """Seed, threads, device, precision, resume, trackers and the non-finite-step limit (shared by every stage)."""


class Resumable(Protocol):
    """What a checkpoint stores and restores: :class:`TrainingState`, or PPO's session."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """The resumable state of a plain training loop: weights, optimizer, LR schedule, guard counters and every RNG
    (one entry per rank under N processes, see :meth:`Runtime.rank_states`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NonFiniteGuard
    runtime: Runtime

    @classmethod
    def adam_cosine(
        cls, model: torch.nn.Module, cfg: Any, total_steps: int, warmup_steps: int, runtime: Runtime
    ) -> TrainingState:
        """AdamW with ``cfg.lr``, ``cfg.betas`` and ``cfg.weight_decay``; linear warmup over ``warmup_steps``, then
        cosine decay to ``cfg.min_lr_ratio`` of the peak at ``total_steps`` (InstructGPT's schedule); the guard
        stops after ``cfg.run.max_nonfinite_steps`` non-finite steps in a row. Under ``run.sharding=fsdp`` the
        model is sharded first (in place), so that the optimizer holds (and steps) the shards."""
        runtime.distribute(model, cfg.run.precision)
        optimizer = make_adam(model.named_parameters(), cfg.lr, cfg.betas, cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
        )
        return cls(model, optimizer, scheduler, NonFiniteGuard(cfg.run.max_nonfinite_steps), runtime)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.runtime.model_state(self.model),
            "optimizer": self.runtime.optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.runtime.rank_states(rng_state()),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runtime.load_model_state(self.model, state["model"])
        self.runtime.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        own_rng = self.runtime.own_rank_state(state["rng"])
        if own_rng is not None:  # None: written by another number of processes; this rank keeps its fresh seed
            set_rng_state(own_rng)
        self.guard.load_state_dict(state.get("guard"))

    def prepare(self, forward: Any = None) -> torch.nn.Module:
        """The model to call in training steps (DDP-wrapped under N processes, see :meth:`Runtime.prepare`); the
        optimizer becomes the prepared one. ``model`` stays the plain module whose weights are read and saved."""
        training_model, self.optimizer = self.runtime.prepare(self.model, self.optimizer, forward=forward)
        return training_model


@dataclass
class TrainingRun:
    """One stage's run in ``cfg.output_dir``: its runtime, the checkpoint it resumes from, metrics and saves."""

    cfg: Any
    """The stage's config: ``output_dir``, ``save_every`` and the ``run`` block are read here."""
    name: str
    """Stage name: the saved config is ``instructrl_<name>.yaml``, the progress bar says it."""
    out: Path
    """The output folder."""
    runtime: Runtime
    """This process's runtime (one process, or this rank of an accelerate/torchrun launch)."""
    checkpoint: tuple[int, dict[str, Any]] | None
    """``(step, state)`` of the newest checkpoint to resume from; None for a fresh start."""
    unit: str = "step"
    """What the checkpoint's number counts, for messages (PPO: "iteration")."""
    started: float = field(default_factory=time.time)
    """Wall-clock time of the start (``seconds`` in results.json)."""

    @classmethod
    def start(cls, cfg: Any, name: str, *, distributed: bool = True, unit: str = "step") -> TrainingRun:
        """Create ``output_dir``, save the config (rank 0), set the threads, seed every RNG (per rank) and find the
        newest checkpoint (with ``run.resume``), refusing one made with results-changing settings.

        ``distributed=False`` keeps one process even under a launcher (a stage without data parallelism)."""
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        runtime = (
            get_runtime(cfg.run.device, cfg.run.sharding) if distributed else Runtime(resolve_device(cfg.run.device))
        )
        if runtime.is_main:
            save_config(cfg, out / f"instructrl_{name}.yaml")
        set_threads(cfg.run.threads)
        runtime.seed(cfg.run.seed)  # per-rank dropout and sampling; data orders use the shared cfg.run.seed
        checkpoint = load_latest_checkpoint(out) if cfg.run.resume else None
        if checkpoint is not None:
            check_resume_compatible(checkpoint[1]["config"], cfg, str(out))
        return cls(cfg, name, out, runtime, checkpoint, unit)

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    @property
    def start_step(self) -> int:
        """The step (iteration) the loop starts after: the checkpoint's, or 0."""
        return self.checkpoint[0] if self.checkpoint is not None else 0

    def restore(self, state: Resumable, **templates: Callable[[], Any]) -> dict[str, Any] | None:
        """Load the checkpoint into ``state``; returns the checkpoint (for the stage's own entries), or None.

        ``templates``: makers of the stage's own entries that hold model weights (SFT's selected epoch), built like
        the saved ones: a sharded run reads its shards into their layout (called only then)."""
        if self.checkpoint is None:
            return None
        step, saved = self.checkpoint
        saved = self.runtime.read_sharded_entries(saved, state, templates)  # a sharded run's models, optimizers, EMA
        state.load_state_dict(saved)
        print(f"resumed from {self.unit} {step}", flush=True)
        return saved

    def metrics_writer(self, file: str = "metrics.jsonl", trackers: bool = True):
        """A writer of ``file`` (rank 0; a no-op elsewhere) that, on resume, drops the lines past the checkpoint;
        mirrored to the ``run.report_to`` trackers (with the config as hyperparameters) unless ``trackers`` is
        false. Closing it finishes the trackers: use it in a ``with`` block so that an error closes them too."""
        resume_step = self.start_step if self.resumed else None
        names = self.cfg.run.tracker_names() if trackers and self.runtime.is_main else []
        started = start_trackers(
            names,
            project=self.cfg.run.tracker_project,
            stage=self.name,
            out=self.out,
            hyperparameters=flat_hyperparameters(to_dict(self.cfg)),
            resume_step=resume_step,
        )
        return self.runtime.metrics_writer(self.out / file, started, resume_step=resume_step)

    def progress(self, total: int) -> tqdm:
        return progress(total, self.start_step, self.name, disable=not self.runtime.is_main)

    def checkpoint_due(self, done: int, total: int) -> bool:
        """A checkpoint every ``save_every`` steps, except at the end (the saved model is the final state)."""
        return done % self.cfg.save_every == 0 and done < total

    def save_checkpoint(self, done: int, state: Resumable, **extra: Any) -> None:
        """Write checkpoint ``done``: the config fingerprint, ``state`` and the stage's own ``extra`` entries."""
        self.runtime.save_checkpoint(
            self.out, done, {"config": resume_fingerprint(self.cfg), **state.state_dict(), **extra}
        )

    def write_results(self, results: dict[str, Any]) -> None:
        """``results.json`` (rank 0), then wait for every rank."""
        if self.runtime.is_main:
            atomic_write_json(self.out / "results.json", results)
        self.runtime.barrier()

    def finish(self, results: dict[str, Any], summary: str) -> dict[str, Any]:
        """The stage's last step: :meth:`write_results`, then print its one-line ``summary``; returns ``results``."""
        self.write_results(results)
        print(summary, flush=True)
        return results

    def seconds(self) -> float:
        return time.time() - self.started
