"""The state of one PPO run (models, optimizers, samplers, KL controller, EMA) and one training iteration.

Everything that a resumed run needs lives in :class:`PPOSession` and round-trips through
``state_dict`` / ``load_state_dict``: policy and value weights, both optimizers, the LR schedule, β, the EMA,
the prompt order and position, the pretraining-window sampler, the sampling and shuffling generators, the
non-finite-step counters and the global RNGs. Each source of randomness has its own generator so that
resuming reproduces the run bit for bit on the same device.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from instructrl.data.loading import load_prompts, load_texts
from instructrl.errors import UserFacingError
from instructrl.models.causal_lm import disable_dropout, load_causal_lm, load_tokenizer
from instructrl.models.kernels import (
    few_rows_cpu_lm_head,
    float32_cpu_attention,
    fuse_activations,
    sparse_untied_embedding_gradient,
    tied_embedding_rows_into_grad,
    zero_gradients,
)
from instructrl.models.reward import init_scalar_head, load_reward_model
from instructrl.rl import AdaptiveKLController, FixedKLController
from instructrl.rollout.sampler import CachedSampler, GenerationBackend, HFGenerateBackend
from instructrl.stages.common import make_adam
from instructrl.stages.ppo_parts import (
    LossSettings,
    PolicyEMA,
    PromptSampler,
    Rollout,
    RolloutSettings,
    ScoreFn,
    SideStats,
    WindowSampler,
    accumulate_policy_gradients,
    accumulate_ptx_gradients,
    accumulate_value_gradients,
    compute_advantages,
    gather_rollout,
    left_pad,
    make_rollout,
    reduce_side_stats,
    response_values,
    reward_model_scorer,
    rollout_metrics,
)
from instructrl.utils.distributed import Runtime, get_runtime
from instructrl.utils.guards import NonFiniteGuard, out_of_memory_advice, require_finite_weights
from instructrl.utils.overlap import Runner, SequentialRunner, add_claim_points, make_runner
from instructrl.utils.seed import rng_state, set_rng_state

if TYPE_CHECKING:
    from instructrl.stages.ppo import Config


# --------------------------------------------------------------------------- setup


def _prepare(model: torch.nn.Module, device: torch.device, trainable: bool) -> torch.nn.Module:
    """Dropout off (N detail 13) and eval mode for every model; frozen models lose their gradients."""
    disable_dropout(model)
    model.eval()  # train() would only switch dropout on, and it is off: eval keeps rollout == training numerics
    model.requires_grad_(trainable)
    return model.to(device)


def use_fused_kernels(
    policy: torch.nn.Module, others: tuple[torch.nn.Module, ...], world_size: int
) -> frozenset[torch.Tensor]:
    """``fused_kernels``: one-kernel activations and float32 attention under bf16 on a CPU in all four models,
    the policy's LM head on few rows as (W · hᵀ)ᵀ when sampling on a CPU in float32; in one process only
    (DDP/ZeRO would miss or misread these gradients), the policy's tied embedding rows added straight into
    ``.grad`` and sparse rows for trainable untied embeddings (the value model). Returns the weights
    whose dense gradient buffers :func:`instructrl.models.kernels.zero_gradients` must keep."""
    for model in (policy, *others):
        fuse_activations(model)
        float32_cpu_attention(model)
    few_rows_cpu_lm_head(policy)  # no-autograd calls only: the sampler's, never training's
    if world_size > 1:
        return frozenset()
    kept = [sparse_untied_embedding_gradient(model) for model in (policy, *others)]
    if tied_embedding_rows_into_grad(policy):  # the LM head's gradient then goes into the same kept buffer
        kept.append(policy.get_input_embeddings().weight)
    return frozenset(weight for weight in kept if weight is not None)


def _announce(message: str) -> None:
    print(message, flush=True)


def _check_vocabulary(model: torch.nn.Module, tokenizer, path: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UserFacingError(
            f"{path} has {rows} token embeddings but the policy's tokenizer has {len(tokenizer)} tokens; "
            "the reward/value model must be built from the same tokenizer as the policy"
        )


def load_scalar_model(path: str, tokenizer, device: torch.device, trainable: bool):
    model = load_reward_model(path)
    _check_vocabulary(model, tokenizer, path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return _prepare(model, device, trainable)


def _check_positions(cfg: Config, policy, prompt_ids: list[list[int]]) -> None:
    """Fail before training when the longest prompt + response (or a ptx window) exceeds the model's positions."""
    limit = getattr(policy.config, "max_position_embeddings", None) or getattr(policy.config, "n_positions", None)
    longest_prompt = max(len(ids) for ids in prompt_ids)
    needed = max(longest_prompt + cfg.generation.max_new_tokens, cfg.ptx.seq_len if cfg.ptx.coef > 0 else 0)
    if limit is not None and needed > limit:
        raise UserFacingError(
            f"the policy handles {limit} positions but the longest prompt ({longest_prompt} tokens) + "
            f"generation.max_new_tokens, or ptx.seq_len, needs {needed}; lower generation.max_prompt_tokens, "
            "generation.max_new_tokens or ptx.seq_len"
        )


def load_prompt_ids(cfg: Config, tokenizer) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids (no special tokens, as SFT encoded them); over-long prompts dropped."""
    if cfg.prompts is not None:
        records, stats = load_prompts(cfg.prompts, skip_bad=cfg.skip_bad)
        print(f"prompts {cfg.prompts}: {stats.summary()}", flush=True)
        texts = [r.prompt for r in records]
    else:
        from instructrl.sandbox import SandboxWorld
        from instructrl.sandbox.datasets import stage_tasks

        # the PPO pool: train-split prompts that neither the SFT nor the RM data used (InstructGPT Table 6)
        texts = [t.prompt for t in stage_tasks(SandboxWorld(seed=cfg.sandbox_seed), "ppo")]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= cfg.generation.max_prompt_tokens]
    dropped = len(texts) - len(keep)
    if dropped:
        print(
            f"dropped {dropped} prompts that are empty or over {cfg.generation.max_prompt_tokens} tokens", flush=True
        )
    if not keep:
        raise UserFacingError("no usable prompts: all are empty or longer than generation.max_prompt_tokens")
    return [texts[i] for i in keep], [encoded[i] for i in keep]


def build_ptx_sampler(cfg: Config, tokenizer) -> WindowSampler:
    """Random windows of the pretraining texts (``ptx.data`` or the sandbox corpus) joined by EOS."""
    from instructrl.stages.pretrain import token_stream

    if cfg.ptx.data is not None:
        records, stats = load_texts(cfg.ptx.data, skip_bad=cfg.skip_bad)
        print(f"ptx data {cfg.ptx.data}: {stats.summary()}", flush=True)
        texts = [r.text for r in records]
    else:
        from instructrl.sandbox import SandboxWorld

        texts = SandboxWorld(seed=cfg.sandbox_seed).pretraining_corpus(cfg.ptx.sandbox_docs, split="train")
    stream = token_stream(texts, tokenizer)
    if len(stream) <= cfg.ptx.seq_len:
        raise UserFacingError(f"pretraining text has {len(stream)} tokens, fewer than one window of {cfg.ptx.seq_len}")
    return WindowSampler(stream, cfg.ptx.seq_len, seed=cfg.run.seed + 3)


def warmup_factor(iteration: int, warmup_iterations: int, start: float = 0.1) -> float:
    """LR multiplier: linear from ``start`` to 1 over ``warmup_iterations``, then 1 (InstructGPT App. C.4)."""
    if warmup_iterations <= 0 or iteration >= warmup_iterations:
        return 1.0
    return start + (1.0 - start) * iteration / warmup_iterations


# --------------------------------------------------------------------------- the session


@dataclass
class PPOSession:
    """Models, data and optimizer state of one PPO run."""

    cfg: Config
    device: torch.device
    tokenizer: Any
    policy: torch.nn.Module
    ref_policy: torch.nn.Module
    reward_model: torch.nn.Module
    value_model: torch.nn.Module
    backend: GenerationBackend
    score_fn: ScoreFn
    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    prompt_sampler: PromptSampler
    ptx_sampler: WindowSampler | None
    policy_optimizer: torch.optim.Optimizer
    value_optimizer: torch.optim.Optimizer
    policy_scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_controller: FixedKLController | AdaptiveKLController
    ema: PolicyEMA | None
    sampling_generator: torch.Generator
    shuffle_generator: torch.Generator
    nonfinite: NonFiniteGuard
    iteration: int = 0
    runtime: Runtime | None = None
    """This process's view of the job (one process, or rank r of N); None = single process."""
    training_policy: torch.nn.Module | None = None
    """The policy as called in training steps (DDP-wrapped under N processes); None = ``policy``."""
    training_value: torch.nn.Module | None = None
    """The value model as called in training steps; None = ``value_model``."""
    dense_grad_buffers: frozenset[torch.Tensor] = frozenset()
    """Weights whose ``.grad`` is a dense buffer zeroed in place between steps (sparse embedding rows are
    added into it; ``fused_kernels``), instead of being set to None."""
    runner: Runner = field(default_factory=SequentialRunner)
    """Runs the policy's and the value model's independent work, at the same time under ``overlap_models``."""

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = Runtime(self.device)
        if self.training_policy is None:
            self.training_policy = self.policy
        if self.training_value is None:
            self.training_value = self.value_model

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.micro_batch_size or self.cfg.minibatch_size

    @property
    def ptx_batch_size(self) -> int:
        """Pretraining windows per optimizer step: ``batch_ratio`` per RL episode of the minibatch."""
        return max(1, round(self.cfg.ptx.batch_ratio * self.cfg.minibatch_size))

    def rollout_settings(self) -> RolloutSettings:
        g = self.cfg.generation
        return RolloutSettings(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            generation_batch_size=g.batch_size,
            forward_batch_size=self.cfg.forward_batch_size or self.micro_batch_size,
            missing_eos_score=self.cfg.missing_eos_score,
            autocast_dtype=self.autocast_dtype,
        )

    def loss_settings(self) -> LossSettings:
        cfg = self.cfg
        return LossSettings(
            cfg.generation.temperature, cfg.clip_range, cfg.value_clip_range, cfg.vf_coef, self.autocast_dtype
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 under ``run.precision=bf16`` (mixed precision for every forward), else None."""
        return torch.bfloat16 if self.cfg.run.precision == "bf16" else None

    def save_policy(self, path: str | Path) -> None:
        """The released policy (EMA weights when enabled) as a Hugging Face causal-LM directory (rank 0 writes)."""
        released = self.ema.swapped_into(self.policy) if self.ema is not None else contextlib.nullcontext()
        with released:
            require_finite_weights(self.policy, f"the policy ({path})")  # every rank: same weights, same verdict
            if self.runtime.is_main:
                self.policy.save_pretrained(path)
                self.tokenizer.save_pretrained(path)
        self.runtime.barrier()

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "policy": self.policy.state_dict(),
            "value_model": self.value_model.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "policy_scheduler": self.policy_scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler is not None else None,
            "sampling_generator": self.runtime.rank_states(self.sampling_generator.get_state()),  # per rank
            "shuffle_generator": self.shuffle_generator.get_state(),  # shared: every rank draws the same minibatches
            "nonfinite": self.nonfinite.state_dict(),
            "rng": self.runtime.rank_states(rng_state()),
            "overlap_models": self.runner.state_dict(),  # overlap_models=auto's choice, kept on resume
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.policy.load_state_dict(state["policy"])
        self.value_model.load_state_dict(state["value_model"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.policy_scheduler.load_state_dict(state["policy_scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        try:
            self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        except ValueError as e:
            raise UserFacingError(f"cannot resume: {e} (the prompt file changed?)") from None
        if self.ptx_sampler is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])
        sampling_state = self.runtime.own_rank_state(state["sampling_generator"])
        if sampling_state is not None:
            self.sampling_generator.set_state(sampling_state)
        self.shuffle_generator.set_state(state["shuffle_generator"])
        own_rng = self.runtime.own_rank_state(state["rng"])
        if own_rng is not None:
            set_rng_state(own_rng)
        self.nonfinite.load_state_dict(state.get("nonfinite"))
        self.runner.load_state_dict(state.get("overlap_models"))
        self.backend.sync_weights(self.policy)


def make_generation_backend(cfg: Config, policy, tokenizer, runtime: Runtime) -> GenerationBackend:
    """The rollout sampler ``generation.backend`` names: our KV-cache loop (default), HF ``generate`` or vLLM."""
    if cfg.generation.backend == "vllm":
        from instructrl.rollout.vllm_backend import VLLMBackend

        try:
            return VLLMBackend(
                cfg.policy,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization,
                seed=runtime.rank_seed(cfg.run.seed + 2),
                under_launcher=runtime.distributed,
            )
        except RuntimeError as e:
            raise UserFacingError(str(e)) from None
    if cfg.generation.backend == "hf":
        return HFGenerateBackend(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return CachedSampler(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_session(cfg: Config, score_fn: ScoreFn | None = None, backend: GenerationBackend | None = None):
    """Load the four models, the prompts and (for PPO-ptx only) the pretraining data; build the optimizers."""
    for key in ("policy", "ref_policy", "reward_model", "value_model"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).exists():
            raise UserFacingError(f"{key}: {path} does not exist (run the earlier stage first, or set {key}=...)")
    runtime = get_runtime(cfg.run.device)  # one process, or this rank of an accelerate/torchrun launch
    runtime.require_divisible(cfg.batch_size, "batch_size")  # each rank rolls out batch_size / N prompts
    runtime.require_divisible(cfg.minibatch_size, "minibatch_size")  # and trains on minibatch_size / N of each step
    device = runtime.device
    tokenizer = load_tokenizer(cfg.policy)
    policy = _prepare(load_causal_lm(cfg.policy, tokenizer), device, trainable=True)
    ref_policy = _prepare(load_causal_lm(cfg.ref_policy or cfg.policy, tokenizer), device, trainable=False)
    reward_model = load_scalar_model(cfg.reward_model, tokenizer, device, trainable=False)
    value_model = load_scalar_model(cfg.value_model or cfg.reward_model, tokenizer, device, trainable=True)
    if cfg.value_head_init == "zero":
        init_scalar_head(value_model, zero=True)
    dense_grad_buffers = frozenset()
    if cfg.fused_kernels:
        dense_grad_buffers = use_fused_kernels(policy, (ref_policy, reward_model, value_model), runtime.world_size)
    prompt_texts, prompt_ids = load_prompt_ids(cfg, tokenizer)
    _check_positions(cfg, policy, prompt_ids)
    ptx_sampler = build_ptx_sampler(cfg, tokenizer) if cfg.ptx.coef > 0 else None  # γ = 0 never reads the data

    fused = device.type in ("cpu", "cuda")  # the fused AdamW kernel: same update, a fraction of the time
    policy_optimizer = make_adam(policy.named_parameters(), cfg.lr, cfg.betas, 0.0, cfg.adam_eps, fused)
    value_optimizer = make_adam(value_model.named_parameters(), cfg.value_lr, cfg.betas, 0.0, cfg.adam_eps, fused)
    warmup = cfg.warmup_iterations
    policy_scheduler = torch.optim.lr_scheduler.LambdaLR(policy_optimizer, lambda it: warmup_factor(it, warmup))
    if cfg.kl.adaptive:
        kl_controller = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    else:
        kl_controller = FixedKLController(cfg.kl.coef)
    sampling_generator = torch.Generator(device=device).manual_seed(runtime.rank_seed(cfg.run.seed + 2))  # per rank
    training_policy, policy_optimizer = runtime.prepare(policy, policy_optimizer)
    training_value, value_optimizer = runtime.prepare(value_model, value_optimizer, forward=response_values)
    runner = make_runner(cfg.overlap_models, device, runtime.world_size, report=_announce)
    if not isinstance(runner, SequentialRunner):  # a side that is done hands its threads to the other
        for model in (policy, ref_policy, reward_model, value_model):
            if model is not None:
                add_claim_points(model)
    return PPOSession(
        cfg=cfg,
        device=device,
        tokenizer=tokenizer,
        policy=policy,
        ref_policy=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        backend=backend or make_generation_backend(cfg, policy, tokenizer, runtime),
        score_fn=score_fn or reward_model_scorer(reward_model),
        prompt_texts=prompt_texts,
        prompt_ids=prompt_ids,
        prompt_sampler=PromptSampler(len(prompt_ids), seed=cfg.run.seed),
        ptx_sampler=ptx_sampler,
        policy_optimizer=policy_optimizer,
        value_optimizer=value_optimizer,
        policy_scheduler=policy_scheduler,
        kl_controller=kl_controller,
        ema=PolicyEMA(policy, cfg.ema_decay) if cfg.ema_decay is not None else None,
        sampling_generator=sampling_generator,
        shuffle_generator=torch.Generator().manual_seed(cfg.run.seed + 1),
        runtime=runtime,
        training_policy=training_policy,
        training_value=training_value,
        nonfinite=NonFiniteGuard(cfg.run.max_nonfinite_steps, unit="iteration"),
        dense_grad_buffers=dense_grad_buffers,
        runner=runner,
    )


# --------------------------------------------------------------------------- one iteration


def collect_rollout(session: PPOSession) -> tuple[Rollout, list[int]]:
    """Draw the next ``batch_size`` prompts and roll them out; returns the rollout and the prompt indices.

    Under N processes every rank draws the same global prompts, rolls out its contiguous share with its own
    sampling seed, and the shares are gathered: the returned rollout is the global batch on every rank.
    """
    index = session.prompt_sampler.next(session.cfg.batch_size)
    local_index = session.runtime.shard(index)
    query, query_mask = left_pad([session.prompt_ids[i] for i in local_index], session.tokenizer.pad_token_id)
    rollout = make_rollout(
        session.policy,
        session.ref_policy,
        session.value_model,
        session.backend,
        session.score_fn,
        query.to(session.device),
        query_mask.to(session.device),
        session.rollout_settings(),
        session.sampling_generator,
        session.runner.choice(),
    )
    return gather_rollout(rollout, session.runtime, session.tokenizer.pad_token_id), index


def minibatch_step(session: PPOSession, minibatch: Rollout) -> dict[str, float | None]:
    """One optimizer step: PPO gradients, then (PPO-ptx) γ × pretraining gradients, accumulated; clip; step.

    ``minibatch`` is the global minibatch; under N processes each rank trains on its contiguous share of it and
    of the ptx windows, with losses normalized by the global token counts. The policy's side (its gradients,
    the ptx gradients, clipping, its optimizer step, the EMA) and the value model's side share nothing, and
    ``session.runner`` runs them at the same time where that pays (``Config.overlap_models``).
    """
    cfg = session.cfg
    runtime = session.runtime
    start, stop = runtime.shard_bounds(minibatch.size)
    local = minibatch.select(slice(start, stop))
    n_tokens = minibatch.response_mask.sum().float() / runtime.world_size
    settings = session.loss_settings()
    clip = cfg.grad_clip or float("inf")

    def policy_side() -> tuple[SideStats, dict[str, float | None]]:
        zero_gradients(session.policy_optimizer, session.dense_grad_buffers)
        side = accumulate_policy_gradients(
            session.training_policy, local, session.micro_batch_size, settings, runtime, n_tokens,
            steps_after=session.ptx_sampler is not None,
        )  # fmt: skip
        extra: dict[str, float | None] = {"loss/ptx": None}
        if session.ptx_sampler is not None:
            windows = session.ptx_sampler.sample(session.ptx_batch_size).to(session.device)  # same on every rank
            micro = cfg.ptx.micro_batch_size or session.micro_batch_size
            extra["loss/ptx"] = accumulate_ptx_gradients(
                session.training_policy, windows, micro, cfg.ptx.coef, runtime, session.autocast_dtype
            )
        extra["policy/grad_norm"] = float(runtime.clip_grad_norm_(session.policy, clip))
        return side, extra

    def value_side() -> tuple[SideStats, dict[str, float | None]]:
        zero_gradients(session.value_optimizer, session.dense_grad_buffers)
        side = accumulate_value_gradients(
            session.training_value, local, session.micro_batch_size, settings, runtime, n_tokens
        )
        return side, {"value/grad_norm": float(runtime.clip_grad_norm_(session.value_model, clip))}

    with session.runner.trial() as runner:  # overlap_models=auto times its first steps both ways
        return _step_both_sides(session, runner, policy_side, value_side)


def _step_both_sides(session: PPOSession, runner, policy_side, value_side) -> dict[str, float | None]:
    (policy_stats, policy_extra), (value_stats, value_extra) = runner.run(policy_side, value_side)
    stats: dict[str, float | None] = {
        **reduce_side_stats([policy_stats, value_stats], session.runtime),
        **policy_extra,
        **value_extra,
    }
    # Gradient norms are all-reduced, so a non-finite value on any rank gives every rank the same verdict.
    checked = {k: v for k, v in stats.items() if k.startswith(("loss/", "policy/grad_norm", "value/grad_norm"))}
    if not session.nonfinite.step_is_finite(session.iteration + 1, **checked):
        return stats  # skipped: no optimizer step and no EMA update; the next zero_grad discards the gradients

    def step_policy() -> None:
        session.policy_optimizer.step()
        if session.ema is not None:
            session.ema.update(session.policy)

    runner.run(step_policy, session.value_optimizer.step)
    return stats


def ppo_update(session: PPOSession, rollout: Rollout) -> list[dict[str, float | None]]:
    """``ppo_epochs`` passes over the batch, reshuffled each pass, one optimizer step per minibatch."""
    cfg = session.cfg
    per_minibatch = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(rollout.size, generator=session.shuffle_generator).to(session.device)
        for start in range(0, rollout.size, cfg.minibatch_size):
            minibatch = rollout.select(order[start : start + cfg.minibatch_size])
            per_minibatch.append(minibatch_step(session, minibatch))
    return per_minibatch


def mean_stats(per_minibatch: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Average each statistic over minibatches (None stays None: e.g. ``loss/ptx`` of plain PPO)."""
    out: dict[str, float | None] = {}
    for key in per_minibatch[0]:
        values = [s[key] for s in per_minibatch if s[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def train_iteration(session: PPOSession) -> tuple[dict[str, Any], Rollout, list[int]]:
    """Rollout, rewards and advantages, PPO update, β and LR schedule steps. Returns (metrics, rollout, prompts)."""
    cfg = session.cfg
    t0 = time.time()
    with out_of_memory_advice(
        "rollout generation", "batch_size", "generation.batch_size", "forward_batch_size", "generation.max_new_tokens"
    ):
        rollout, prompt_index = collect_rollout(session)
    beta = session.kl_controller.value
    rollout = compute_advantages(rollout, beta, cfg.gamma, cfg.lam, cfg.whiten_rewards, cfg.whiten_advantages)
    metrics: dict[str, Any] = rollout_metrics(rollout, beta)
    t1 = time.time()

    with out_of_memory_advice("the PPO update", "micro_batch_size", "ptx.micro_batch_size", "ptx.seq_len"):
        per_minibatch = ppo_update(session, rollout)
    metrics.update(mean_stats(per_minibatch))
    metrics["policy/lr"] = session.policy_optimizer.param_groups[0]["lr"]
    metrics["value/lr"] = session.value_optimizer.param_groups[0]["lr"]
    session.kl_controller.update(metrics["objective/kl"], rollout.size)
    session.policy_scheduler.step()
    session.backend.sync_weights(session.policy)
    session.iteration += 1

    t2 = time.time()
    metrics["episodes"] = session.iteration * cfg.batch_size
    metrics["prompt_passes"] = session.prompt_sampler.passes
    metrics.update(session.nonfinite.metrics())
    metrics.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0})
    return metrics, rollout, prompt_index
