"""Stage 3 — PPO and PPO-ptx against the reward model (InstructGPT §3.5, App. C.4).

Maximises InstructGPT Eq. 2 over the policy φ:

    objective(φ) = E_{(x,y)~π_φ} [ r_θ(x, y) − β · log(π_φ(y|x) / π^SFT(y|x)) ] + γ · E_{x~D_pretrain} [ log π_φ(x) ]

γ = 0 is "PPO"; γ > 0 (``ptx.coef``) is "PPO-ptx", what the paper calls InstructGPT. :func:`train_iteration`
is one iteration, in the order of the recipe below; :func:`run` repeats it, logs, checkpoints and saves.

One iteration:
  1. Sample: draw ``batch_size`` prompts (cycled, reshuffled every pass) and sample one response each with
     pure sampling at temperature T, cut at the first EOS.
  2. Score: forward passes (position ids that skip left padding) give log π (logits / T), log π^SFT, the
     values V and the RM score r_θ at the EOS; a response without EOS gets ``missing_eos_score`` instead (the
     EOS trick).
  3. Rewards and advantages: −β·(log π − log π^SFT) per token plus r_θ at the last token; GAE (γ = 1,
     λ = 0.95); advantage whitening over the batch; optional reward whitening.
  4. Update: ``ppo_epochs`` passes over the batch, reshuffled each time, cut into minibatches of
     ``minibatch_size`` episodes (one optimizer step each for the policy and for the value model) and
     micro-batches (gradient accumulation). The policy's step accumulates the clipped surrogate and, for
     PPO-ptx, γ × the LM loss on ``ptx.batch_ratio`` × ``minibatch_size`` pretraining windows, then updates
     its EMA; the value model's step the clipped value loss.
  5. β update (adaptive controller only), warmup LR schedule step, the sampler synced to the new weights.

After every iteration the guardrails (:mod:`.ppo_guardrails`) check the rollout for the signs of reward hacking
(KL, entropy, distinct responses, missing EOS, RM scores beyond the reward model's range) and warn; they only
observe, unless ``guardrails.stop`` ends the run early.

Where the pieces live: the experience (sampling, scoring, rewards, advantages) in :mod:`.ppo_rollout`, the
two optimizer steps in :mod:`.ppo_trainers`, the losses themselves in :mod:`instructrl.rl`, building the run
and its checkpoint state in :mod:`.ppo_build`, the settings in :mod:`.ppo_config`. The bracketed
"ppo-details" names cite the implementation details listed in docs/ppo-details.md.

Models: the policy and the frozen reference π^SFT both start from ``policy`` (the SFT model); the reward
model is frozen; the value function is a separate network initialized from the reward model (the paper's
choice [ppo-details: value-from-rm]; ``value_head_init=zero`` re-initializes its head to 0 instead
[ppo-details: value-head-zero-init]). Dropout is off in all four, and they stay in eval mode, so the rollout
and training forward passes are the same computation.

Outputs in ``output_dir``: ``policy/`` (the released policy: the EMA weights when ``ema_decay`` is set, as a
Hugging Face causal-LM directory with tokenizer), ``value/``, ``metrics.jsonl``, ``samples.jsonl``,
``results.json`` (with a ``guardrails`` record), ``policy_best/`` (the released weights whose samples
were the last to pass every guardrail before one first failed), the resolved config, resumable
``checkpoints/`` and, with ``save_policy_every``, ``policy-iter-XXXX/`` snapshots for over-optimization curves.
A rerun with the same config resumes from the newest checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from instructrl.errors import UserFacingError
from instructrl.stages.ppo_build import PPORun, build_run
from instructrl.stages.ppo_config import Config, GenerationSettings, KLSettings, PtxSettings
from instructrl.stages.ppo_guardrails import RunGuard
from instructrl.stages.ppo_rollout import (
    Rollout,
    compute_advantages,
    gather_rollout,
    left_pad,
    rollout_metrics,
    sample_responses,
    score_rollout,
)
from instructrl.stages.ppo_trainers import reduce_side_stats
from instructrl.stages.training_run import TrainingRun
from instructrl.utils.guards import out_of_memory_advice
from instructrl.utils.io import MetricsWriter, read_jsonl_lenient

__all__ = ["Config", "GenerationSettings", "KLSettings", "PtxSettings", "run", "train_iteration"]


# --------------------------------------------------------------------------- one iteration


def train_iteration(run: PPORun) -> tuple[dict[str, Any], Rollout, list[int]]:
    """One PPO iteration, steps 1-5 of the module docstring. Returns (metrics, the rollout, its prompts' indices).

    Under N processes every rank draws the same global prompts, samples and scores its contiguous share with
    the generators of its sampling shards (:class:`~.ppo_rollout.SamplingShards`: the same tokens at any N), and
    the shares are gathered: from step 3 on every rank holds the global batch, and each optimizer step trains
    on its share of every minibatch.
    """
    cfg, generation, models, runtime = run.cfg, run.cfg.generation, run.models, run.runtime
    eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    started = time.time()

    # 1. Sample y ~ π_φ(·|x) for the next batch_size prompts (this rank's share).
    prompt_index = run.prompts.next_batch(cfg.batch_size)
    query, query_mask = left_pad([run.prompts.ids[i] for i in runtime.shard(prompt_index)], pad)
    query, query_mask = query.to(runtime.device), query_mask.to(runtime.device)
    rollout_oom = ("batch_size", "generation.batch_size", "forward_batch_size", "generation.max_new_tokens")
    with out_of_memory_advice("rollout generation", *rollout_oom), models.precision():
        response, response_mask, has_eos = sample_responses(
            run.sampler, query, query_mask, generation.max_new_tokens, generation.temperature, eos, pad,
            generation.batch_size, run.sampling.owned(),
        )  # fmt: skip

        # 2. Score: log π and log π^SFT at temperature T, values V, r_θ(x, y) at the EOS (the EOS trick).
        rollout = score_rollout(
            models, query, query_mask, response, response_mask, has_eos, generation.temperature,
            cfg.missing_eos_score, cfg.forward_batch_size or cfg.micro_batch_size or cfg.minibatch_size,
        )  # fmt: skip
    rollout = gather_rollout(rollout, runtime, pad)  # every rank now holds the global batch

    # 3. Rewards r_t = −β·(log π − log π^SFT)_t (+ r_θ at the last token), GAE, whitening over the batch.
    beta = run.kl_controller.value
    rollout = compute_advantages(rollout, beta, cfg.gamma, cfg.lam, cfg.whiten_rewards, cfg.whiten_advantages)
    metrics: dict[str, Any] = rollout_metrics(rollout, beta)
    sampled_and_scored = time.time()

    # 4. PPO epochs: shuffle, then per minibatch one optimizer step of the policy (clipped surrogate
    #    + γ · ptx loss, then its EMA) and one of the value model (clipped value loss).
    per_minibatch = []
    with out_of_memory_advice("the PPO update", "micro_batch_size", "ptx.micro_batch_size", "ptx.seq_len"):
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rollout.size, generator=run.shuffle_generator).to(runtime.device)
            for first in range(0, rollout.size, cfg.minibatch_size):
                minibatch = rollout.select(order[first : first + cfg.minibatch_size])
                policy_side, value_side = models.side_by_side(
                    partial(run.actor.train_step, minibatch), partial(run.critic.train_step, minibatch)
                )
                stats = reduce_side_stats([policy_side, value_side], runtime)
                checked = {k: v for k, v in stats.items() if k.startswith(("loss/", "policy/grad_", "value/grad_"))}
                run.nonfinite.step_is_finite(run.iteration + 1, **checked)  # a NaN/inf step was skipped: count it
                per_minibatch.append(stats)
    metrics.update(mean_stats(per_minibatch))

    # 5. β controller, LR schedule, the sampler synced to the new weights.
    metrics["policy/lr"] = run.actor.optimizer.param_groups[0]["lr"]
    metrics["value/lr"] = run.critic.optimizer.param_groups[0]["lr"]
    run.kl_controller.update(metrics["objective/kl"], rollout.size)
    run.actor.scheduler.step()
    run.sampler.sync_weights(models.policy)
    run.iteration += 1

    finished = time.time()
    metrics["episodes"] = run.iteration * cfg.batch_size
    metrics["prompt_passes"] = run.prompts.order.passes
    metrics.update(run.nonfinite.metrics())
    metrics.update({"time/rollout": sampled_and_scored - started, "time/update": finished - sampled_and_scored,
                    "time/iteration": finished - started})  # fmt: skip
    return metrics, rollout, prompt_index


def mean_stats(per_minibatch: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Average each statistic over minibatches (None stays None: e.g. ``loss/ptx`` of plain PPO)."""
    out: dict[str, float | None] = {}
    for key in per_minibatch[0]:
        values = [s[key] for s in per_minibatch if s[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


# --------------------------------------------------------------------------- the loop


def run(cfg: Config, score_fn=None, sampler=None) -> dict:
    """Train; returns the results dict (also written to results.json).

    ``score_fn`` replaces the reward model's score (``score_fn(query, query_mask, response, response_mask)
    -> (B,)``, e.g. a programmatic reward); ``sampler`` replaces the one ``generation.backend`` names.

    Under ``accelerate launch`` / ``torchrun`` with N processes each rank rolls out and trains on its share of
    every batch (see :func:`train_iteration`); rank 0 alone writes files.
    """
    stage = TrainingRun.start(cfg, "ppo", unit="iteration")
    out, runtime = stage.out, stage.runtime

    ppo_run = build_run(cfg, score_fn=score_fn, sampler=sampler)
    saved = stage.restore(ppo_run)
    print(_describe(ppo_run), flush=True)
    guard = RunGuard(cfg, ppo_run, rm_scores=score_fn is None, checkpoint=saved)  # prints start-up warnings

    metrics = stage.metrics_writer()
    samples = stage.metrics_writer("samples.jsonl", trackers=False)
    bar = stage.progress(cfg.iterations)
    try:
        while ppo_run.iteration < cfg.iterations:
            record, rollout, prompt_index = train_iteration(ppo_run)
            done = ppo_run.iteration
            record.update(guard.after_iteration(ppo_run, record, rollout))  # checks, flags, best policy: they observe
            metrics.log(done, **record)
            bar.set_postfix(score=f"{record['objective/score']:.3f}", kl=f"{record['objective/kl']:.3f}")
            bar.update(1)
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == 1) and runtime.is_main:
                _log_samples(ppo_run, samples, done, rollout, prompt_index)
            if cfg.save_policy_every and done % cfg.save_policy_every == 0:
                ppo_run.save_policy(out / f"policy-iter-{done:04d}")
            if stage.checkpoint_due(done, cfg.iterations):
                stage.save_checkpoint(done, ppo_run, guardrails=guard.state_dict())
            if guard.stopped:
                break
    finally:
        bar.close()
        metrics.close()
        samples.close()
        ppo_run.close()  # overlap_models' worker threads

    ppo_run.save_policy(out / "policy")
    guard.save_best(ppo_run, out / "policy_best")
    runtime.save_pretrained(ppo_run.critic.model, ppo_run.tokenizer, out / "value", "the value model")
    # metrics.jsonl is complete (save_pretrained ends with a barrier): every rank may summarize it
    results = _results(cfg, ppo_run, out, stage.seconds(), guard)
    return stage.finish(
        results,
        f"ppo: score {results['score_first_iteration']:.3f} -> {results['score_last_iteration']:.3f}, "
        f"KL {results['kl_last_iteration']:.3f} nats; policy saved to {out / 'policy'}"
        + (f" (stopped early at iteration {ppo_run.iteration}: guardrails.stop)" if guard.stopped else ""),
    )


def _describe(run: PPORun) -> str:
    cfg = run.cfg
    variant = f"PPO-ptx (γ = {cfg.ptx.coef})" if cfg.ptx.coef > 0 else "PPO (γ = 0)"
    beta = f"adaptive β from {cfg.kl.coef} toward {cfg.kl.target} nats" if cfg.kl.adaptive else f"β = {cfg.kl.coef}"
    return (
        f"ppo: {variant}, {beta}; {len(run.prompts.ids)} prompts; {cfg.iterations} iterations × "
        f"{cfg.batch_size} episodes; device {run.runtime.device}"
    )


def _log_samples(run: PPORun, writer: MetricsWriter, step: int, rollout, prompt_index: list[int]) -> None:
    """Print a small table of this iteration's generations and append them to samples.jsonl."""
    tok = run.tokenizer
    rows = []
    for i in range(min(run.cfg.num_samples, rollout.size)):
        length = int(rollout.response_mask[i].sum())
        response_ids = rollout.response[i, :length].tolist()
        rows.append(
            {
                "prompt": run.prompts.texts[prompt_index[i]],
                "response": tok.decode(response_ids, skip_special_tokens=True),
                "score": float(rollout.scores[i]),
                "has_eos": bool(rollout.has_eos[i]),
                "kl": float(rollout.kl[i].sum()) if rollout.kl is not None else None,
            }
        )
    lines = [f"--- samples at iteration {step}", f"{'score':>7} {'kl':>6} eos  prompt ⟶ response"]
    for row in rows:
        prompt = " ".join(row["prompt"].split())[-60:]
        response = " ".join(row["response"].split())[:80]
        kl = f"{row['kl']:6.2f}" if row["kl"] is not None else "     -"
        lines.append(f"{row['score']:7.3f} {kl} {'yes' if row['has_eos'] else ' no'}  …{prompt} ⟶ {response}")
        writer.log(step, **row)
    print("\n".join(lines), flush=True)


SUMMARY_METRICS = (
    "objective/reward",
    "objective/score",
    "objective/kl",
    "objective/kl_k3",
    "objective/beta",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "loss/ptx",
    "policy/approx_kl",
    "policy/clipfrac",
    "value/clipfrac",
    "value/explained_variance",
    "response/length",
    "response/eos_rate",
    "response/distinct_fraction",
)


def _results(cfg: Config, run: PPORun, out: Path, seconds: float, guard: RunGuard) -> dict:
    records = read_jsonl_lenient(out / "metrics.jsonl")
    if not records:
        raise UserFacingError(f"{out / 'metrics.jsonl'} holds no iterations; nothing to summarize")
    first, last = records[0], records[-1]
    return {
        "variant": "PPO-ptx" if cfg.ptx.coef > 0 else "PPO",
        "iterations": cfg.iterations,
        "iterations_done": run.iteration,
        "episodes": run.iteration * cfg.batch_size,
        "score_first_iteration": first["objective/score"],
        "score_last_iteration": last["objective/score"],
        "kl_last_iteration": last["objective/kl"],
        "beta_final": run.kl_controller.value,
        "last_iteration": {k: last.get(k) for k in SUMMARY_METRICS},
        "released_weights": "ema" if run.actor.ema is not None else "live",
        "policy_dir": str(out / "policy"),
        "value_dir": str(out / "value"),
        "guardrails": guard.finish(records),
        "seconds": seconds,
    }
