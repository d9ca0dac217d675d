"""The actor and the critic of PPO: one optimizer step each on a minibatch of the rollout.

:class:`PolicyTrainer` steps π_φ on the clipped surrogate (+ γ × the pretraining loss for PPO-ptx) and keeps
its EMA; :class:`ValueTrainer` steps V on the clipped value loss. The two share nothing, so the PPO loop may
run their steps one after the other or at once. Both train on this rank's share of a global minibatch, with
losses normalized by the global token counts, so N processes reproduce one (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from instructrl.models.logprobs import FullLogits
from instructrl.rl import policy_loss, ptx_loss, value_loss
from instructrl.stages.common import mixed_precision
from instructrl.stages.ppo_data import WindowSampler
from instructrl.stages.ppo_rollout import Rollout, response_values, row_chunks
from instructrl.utils.distributed import Runtime, call_model_function


@dataclass
class SideStats:
    """One model's statistics of a minibatch on this rank, before the reduction over ranks."""

    losses: dict[str, float | None]
    """Loss sums over micro-batches (each a masked sum / the minibatch normalizer); None: not computed."""
    means: WeightedMeans
    """Token-weighted means (approx-KL, clip fractions)."""
    maxima: dict[str, float]
    """Maxima over micro-batches (the largest policy ratio)."""
    norms: dict[str, float]
    """Gradient norms before clipping (already global: the same on every rank)."""

    @property
    def finite(self) -> bool:
        """Whether every loss and gradient norm is finite: the optimizer stepped only then."""
        values = [*self.norms.values(), *(v for v in self.losses.values() if v is not None)]
        return all(math.isfinite(v) for v in values)


def this_ranks_share(minibatch: Rollout, runtime: Runtime) -> tuple[Rollout, torch.Tensor]:
    """This rank's contiguous share of a global minibatch, and the divisor of its masked loss sums: the
    minibatch's token count / N (DDP averages gradients over ranks), so the sums add up to the global mean."""
    start, stop = runtime.shard_bounds(minibatch.size)
    return minibatch.select(slice(start, stop)), minibatch.response_mask.sum().float() / runtime.world_size


@dataclass
class PretrainingMix:
    """The γ · E_{x~D_pretrain}[log π(x)] term of PPO-ptx [ppo-details: ppo-ptx]: its data and its size."""

    windows: WindowSampler
    """Random windows of the pretraining stream; every rank draws the same ones."""
    coef: float
    """γ."""
    batch_size: int
    """Windows per optimizer step (``ptx.batch_ratio`` × ``minibatch_size``)."""
    micro_batch_size: int
    """Windows per forward/backward."""


@dataclass
class SideTrainer:
    """What each side of a PPO step holds, the actor's and the critic's alike: a model, its optimizer and how a
    step runs it."""

    model: torch.nn.Module
    """The model as loaded: the weights the run saves (and, for π_φ, the EMA follows)."""
    training_model: torch.nn.Module
    """The model as called in training steps (DDP-wrapped under N processes)."""
    optimizer: torch.optim.Optimizer
    runtime: Runtime
    grad_clip: float
    """Gradient-norm clip; 0 = none."""
    micro_batch_size: int
    """Episodes per forward/backward."""
    autocast_dtype: torch.dtype | None
    """The forward passes' mixed-precision dtype (``precision``); None = the weights' own."""


@dataclass
class PolicyTrainer(SideTrainer):
    """The actor: π_φ, its optimizer, its LR schedule, its EMA and (PPO-ptx) the pretraining mix."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    logprobs: FullLogits
    """How log π is computed (the same as in the rollout, so the first ratio is 1)."""
    temperature: float
    clip_range: float
    """ε of the clipped surrogate."""
    ema: PolicyEMA | None = None
    ptx: PretrainingMix | None = None

    def train_step(self, minibatch: Rollout) -> SideStats:
        """One optimizer step on the global ``minibatch``: ∇ clipped surrogate (+ γ · ∇ ptx loss), gradient clip,
        AdamW, EMA. The step is skipped when a loss or the gradient norm is NaN/inf (a NaN/inf loss has a NaN/inf
        gradient, and the gradient norm is the same number on every rank, so every rank skips alike)."""
        local, n_tokens = this_ranks_share(minibatch, self.runtime)
        self.optimizer.zero_grad(set_to_none=True)
        means, loss, ratio_max = WeightedMeans(), 0.0, 0.0
        chunks = list(row_chunks(local.size, self.micro_batch_size))
        for index, rows in enumerate(chunks):
            synced = index == len(chunks) - 1 and self.ptx is None  # DDP all-reduces once, after the last backward
            with self.runtime.no_sync([] if synced else [self.training_model]):
                micro = local.select(rows)
                input_ids, attention_mask = micro.inputs()
                with mixed_precision(input_ids.device, self.autocast_dtype):  # the forward only; backward follows
                    logprobs = self.logprobs.responses(
                        self.training_model, input_ids, attention_mask, micro.response, self.temperature
                    )
                pg_loss, pg_stats = policy_loss(
                    logprobs, micro.logprobs, micro.advantages, micro.response_mask, self.clip_range, n_tokens
                )
                self.runtime.backward(pg_loss)
            loss += pg_loss.item()
            ratio_max = max(ratio_max, pg_stats["policy/ratio_max"].item())
            means.add(
                micro.response_mask.sum().item(),
                {"policy/approx_kl": pg_stats["policy/approxkl_k3"], "policy/clipfrac": pg_stats["policy/clipfrac"]},
            )
        losses = {"loss/policy": loss, "loss/ptx": self._add_ptx_gradients() if self.ptx is not None else None}
        grad_norm = float(self.runtime.clip_grad_norm_(self.model, self.grad_clip or math.inf))
        stats = SideStats(losses, means, {"policy/ratio_max": ratio_max}, {"policy/grad_norm": grad_norm})
        if stats.finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return stats

    def _add_ptx_gradients(self) -> float:
        """Add γ · ∇(−mean log π(x)) over this step's pretraining windows to ``.grad``; returns the ptx loss.

        The γ·E_{x~D_pretrain}[log π(x)] term of InstructGPT Eq. 2 as a loss, accumulated into the same gradient
        as the PPO minibatch before the optimizer step (App. C.4); a token mean over the whole ptx batch. Every
        rank draws the same windows and trains on its share of the rows.
        """
        windows = self.ptx.windows.sample(self.ptx.batch_size).to(self.runtime.device)  # (B, L)
        n_tokens = windows.shape[0] * (windows.shape[1] - 1) / self.runtime.world_size
        start, stop = self.runtime.shard_bounds(windows.shape[0])
        local = windows[start:stop]
        chunks = list(row_chunks(local.shape[0], self.ptx.micro_batch_size))
        total = 0.0
        for index, (rows, counted) in enumerate(self.runtime.lockstep(chunks)):  # counted False: weight 0
            with self.runtime.no_sync([self.training_model] if index < len(chunks) - 1 else []):
                with mixed_precision(windows.device, self.autocast_dtype):
                    logprobs = self.logprobs.texts(self.training_model, local[rows])
                loss, _ = ptx_loss(logprobs, torch.ones_like(logprobs, dtype=torch.bool), normalizer=n_tokens)
                self.runtime.backward(self.ptx.coef * loss if counted else 0.0 * loss)
            total += loss.item() if counted else 0.0
        return total


@dataclass
class ValueTrainer(SideTrainer):
    """The critic: V and its optimizer; its ``training_model`` is wrapped so that DDP sees
    :func:`response_values` as its forward."""

    value_clip_range: float
    """How far V may move from its rollout value before the clipped loss takes over."""
    vf_coef: float
    """Weight of the value loss."""

    def train_step(self, minibatch: Rollout) -> SideStats:
        """One optimizer step on the global ``minibatch``: ∇ vf_coef · clipped value loss, gradient clip, AdamW
        (skipped when the loss or the gradient norm is NaN/inf)."""
        local, n_tokens = this_ranks_share(minibatch, self.runtime)
        self.optimizer.zero_grad(set_to_none=True)
        means, loss = WeightedMeans(), 0.0
        chunks = list(row_chunks(local.size, self.micro_batch_size))
        for index, rows in enumerate(chunks):
            with self.runtime.no_sync([] if index == len(chunks) - 1 else [self.training_model]):
                micro = local.select(rows)
                input_ids, attention_mask = micro.inputs()
                width = micro.response.shape[1]
                with mixed_precision(input_ids.device, self.autocast_dtype):
                    values = call_model_function(
                        self.training_model, response_values, input_ids, attention_mask, width
                    )
                vf_loss, vf_stats = value_loss(
                    values, micro.values, micro.returns, micro.response_mask, self.value_clip_range, n_tokens
                )
                self.runtime.backward(self.vf_coef * vf_loss)
            loss += vf_loss.item()
            means.add(micro.response_mask.sum().item(), {"value/clipfrac": vf_stats["val/clipfrac"]})
        grad_norm = float(self.runtime.clip_grad_norm_(self.model, self.grad_clip or math.inf))
        stats = SideStats({"loss/value": loss}, means, {}, {"value/grad_norm": grad_norm})
        if stats.finite:
            self.optimizer.step()
        return stats


def reduce_side_stats(sides: list[SideStats], runtime: Runtime) -> dict[str, float]:
    """The minibatch's statistics over every rank: losses averaged (each rank's loss is its sum over the global
    count / N), token-weighted means, maxima. One collective per kind whatever the number of sides."""
    losses = {k: v for side in sides for k, v in side.losses.items() if v is not None}
    means = WeightedMeans()
    means.weight = sides[0].means.weight  # every side weighs the same micro-batches by the same token counts
    means.sums = {k: v for side in sides for k, v in side.means.sums.items()}
    maxima = {k: runtime.max(v) for side in sides for k, v in side.maxima.items()}
    not_computed = {k: None for side in sides for k, v in side.losses.items() if v is None}
    norms = {k: v for side in sides for k, v in side.norms.items()}
    return {**_mean_over_ranks(losses, runtime), **means.reduced(runtime), **maxima, **not_computed, **norms}


def _mean_over_ranks(losses: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Each rank's loss is its sum over (global count / N): the global loss is the mean over ranks."""
    return {k: v / runtime.world_size for k, v in runtime.sums(losses).items()}


class WeightedMeans:
    """Weighted running means of named scalars (weights: token counts)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, weight: float, values: dict[str, torch.Tensor | float]) -> None:
        self.weight += weight
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * float(value)

    def means(self) -> dict[str, float]:
        return {k: v / self.weight if self.weight else 0.0 for k, v in self.sums.items()}

    def reduced(self, runtime: Runtime) -> dict[str, float]:
        """The means over every rank's values (weights and weighted sums added up across ranks)."""
        if not runtime.distributed:
            return self.means()
        totals = runtime.sums({**self.sums, "__weight__": self.weight})
        weight = totals.pop("__weight__")
        return {k: v / weight if weight else 0.0 for k, v in totals.items()}


class PolicyEMA:
    """Exponential moving average of the policy weights, θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer
    step (InstructGPT App. C.4: d = 0.992) [ppo-details: policy-ema]. Kept in float32; the released model is
    the EMA."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def swapped_into(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. to save it); the live weights come back after."""
        return swapped_weights(model, self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Temporarily load ``weights`` (by parameter name) into ``model``; its own weights come back after."""
    backup = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(backup[name])
