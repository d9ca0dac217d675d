"""Building a PPO run: the four models, the actor and the critic, the data, and the state a checkpoint keeps.

:func:`build_run` loads everything once into small records (:class:`PPORun`); the PPO loop
(:func:`instructrl.stages.ppo.train_iteration`) only steps them. Speed options are chosen here, once, and reach
the loop through two seams of :class:`~instructrl.stages.ppo_rollout.PPOModels`: ``logprobs`` and
``side_by_side`` (:mod:`instructrl.fast`).

Everything a resumed run needs round-trips through :meth:`PPORun.state_dict` / :meth:`PPORun.load_state_dict`:
policy and value weights, both optimizers, the LR schedule, β, the EMA, the prompt order and position, the
pretraining-window sampler, the sampling shards' and the shuffling generators, the non-finite-step counters
and the global RNGs. Each source of randomness has its own generator so that resuming reproduces the run bit
for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructrl.errors import UserFacingError
from instructrl.fast.head import FusedHeadLogProbs
from instructrl.fast.kernels import keep_dense_gradients, speed_up_ppo_models
from instructrl.fast.overlap import SequentialRunner, add_claim_points, make_runner
from instructrl.fast.sampler import CachedSampler
from instructrl.models.causal_lm import disable_dropout, load_causal_lm, load_tokenizer
from instructrl.models.logprobs import FullLogits
from instructrl.models.reward import init_scalar_head, load_reward_model
from instructrl.rl import AdaptiveKLController, FixedKLController
from instructrl.rollout.sampler import GenerationBackend, HFGenerateBackend
from instructrl.stages.common import log_data_source, make_adam
from instructrl.stages.ppo_config import Config
from instructrl.stages.ppo_data import PromptData, load_pretraining_windows, load_prompt_data
from instructrl.stages.ppo_rollout import PPOModels, SamplingShards, ScoreFn, response_values, reward_model_scorer
from instructrl.stages.ppo_trainers import PolicyEMA, PolicyTrainer, PretrainingMix, ValueTrainer, swapped_weights
from instructrl.utils.distributed import Runtime, get_runtime
from instructrl.utils.guards import NonFiniteGuard
from instructrl.utils.seed import rng_state, set_rng_state


@dataclass
class PPORun:
    """One PPO run: what :func:`build_run` loads, what :func:`~instructrl.stages.ppo.train_iteration` steps."""

    cfg: Config
    runtime: Runtime
    """This process's view of the job (one process, or rank r of N)."""
    tokenizer: Any
    models: PPOModels
    actor: PolicyTrainer
    critic: ValueTrainer
    prompts: PromptData
    sampler: GenerationBackend
    """Samples responses from the live policy (``generation.backend``)."""
    kl_controller: FixedKLController | AdaptiveKLController
    """β of the KL penalty."""
    sampling: SamplingShards
    """The rollout's sampling randomness: a generator per sampling shard, this process sampling its own."""
    shuffle_generator: torch.Generator
    """Minibatch order; the same on every rank."""
    nonfinite: NonFiniteGuard
    close: Callable[[], None]
    """Stops what the run started besides the models (``overlap_models``' threads)."""
    iteration: int = 0

    def save_policy(self, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The released policy (EMA weights when enabled), or the given ``weights``, as a Hugging Face causal-LM
        directory (rank 0 writes)."""
        policy, ema = self.models.policy, self.actor.ema
        if weights is None and ema is not None:
            weights = ema.shadow
        with swapped_weights(policy, weights) if weights is not None else contextlib.nullcontext():
            self.runtime.save_pretrained(policy, self.tokenizer, path, f"the policy ({path})")

    def state_dict(self) -> dict[str, Any]:
        actor, critic = self.actor, self.critic
        return {
            "iteration": self.iteration,
            "policy": self.runtime.model_state(actor.model),
            "value_model": self.runtime.model_state(critic.model),
            "policy_optimizer": self.runtime.optimizer_state(actor.model, actor.optimizer),
            "value_optimizer": self.runtime.optimizer_state(critic.model, critic.optimizer),
            "policy_scheduler": actor.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "ema": actor.ema.state_dict() if actor.ema is not None else None,
            "prompt_sampler": self.prompts.order.state_dict(),
            "ptx_sampler": actor.ptx.windows.state_dict() if actor.ptx is not None else None,
            "sampling_shards": self.sampling.state_dict(),  # every shard's, whichever process sampled it
            "shuffle_generator": self.shuffle_generator.get_state(),  # shared: every rank draws the same minibatches
            "nonfinite": self.nonfinite.state_dict(),
            "rng": self.runtime.rank_states(rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        actor, critic = self.actor, self.critic
        self.iteration = int(state["iteration"])
        self.runtime.load_model_state(actor.model, state["policy"])
        self.runtime.load_model_state(critic.model, state["value_model"])
        self.runtime.load_optimizer_state(actor.model, actor.optimizer, state["policy_optimizer"])
        self.runtime.load_optimizer_state(critic.model, critic.optimizer, state["value_optimizer"])
        actor.scheduler.load_state_dict(state["policy_scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if actor.ema is not None:
            actor.ema.load_state_dict(state["ema"])
        try:
            self.prompts.order.load_state_dict(state["prompt_sampler"])
        except ValueError as e:
            raise UserFacingError(f"cannot resume: {e} (the prompt file changed?)") from None
        if actor.ptx is not None:
            actor.ptx.windows.load_state_dict(state["ptx_sampler"])
        self.sampling.load_state_dict(_sampling_states(state))
        self.shuffle_generator.set_state(state["shuffle_generator"])
        own_rng = self.runtime.own_rank_state(state["rng"])
        if own_rng is not None:
            set_rng_state(own_rng)
        self.nonfinite.load_state_dict(state.get("nonfinite"))
        self.sampler.sync_weights(actor.model)


def build_run(cfg: Config, score_fn: ScoreFn | None = None, sampler: GenerationBackend | None = None) -> PPORun:
    """Load the four models, the prompts and (PPO-ptx only) the pretraining data; build the optimizers.

    ``score_fn`` replaces the reward model's score r(x, y) (e.g. a programmatic reward); ``sampler`` replaces
    the one ``generation.backend`` names."""
    for key in ("policy", "ref_policy", "reward_model", "value_model"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).exists():
            raise UserFacingError(f"{key}: {path} does not exist (run the earlier stage first, or set {key}=...)")
    runtime = get_runtime(cfg.run.device, cfg.run.sharding)  # one process, or this rank of a launch
    runtime.require_divisible(cfg.batch_size, "batch_size")  # each rank rolls out batch_size / N prompts
    runtime.require_divisible(cfg.minibatch_size, "minibatch_size")  # and trains on minibatch_size / N of each step
    device = runtime.device
    tokenizer = load_tokenizer(cfg.policy)
    policy = _prepare(load_causal_lm(cfg.policy, tokenizer), device, trainable=True)
    ref_policy = _prepare(load_causal_lm(cfg.ref_policy or cfg.policy, tokenizer), device, trainable=False)
    reward_model = _load_scalar_model(cfg.reward_model, tokenizer, device, trainable=False)
    value_model = _load_scalar_model(cfg.value_model or cfg.reward_model, tokenizer, device, trainable=True)
    if cfg.value_head_init == "zero":
        init_scalar_head(value_model, zero=True)  # [ppo-details: value-head-zero-init]

    # Speed options, chosen once: kernels swapped into the models, and the two seams of PPOModels.
    kept_gradients = frozenset()
    if cfg.fused_kernels:
        kept_gradients = speed_up_ppo_models(policy, (ref_policy, reward_model, value_model), runtime.world_size)
    runner = make_runner(cfg.overlap_models, device, runtime.world_size, report=_announce)
    if not isinstance(runner, SequentialRunner):  # a side that is done hands its threads to the other
        for model in (policy, ref_policy, reward_model, value_model):
            add_claim_points(model)
    for model in (policy, value_model, *((ref_policy, reward_model) if cfg.frozen_models == "sharded" else ())):
        runtime.distribute(model, cfg.run.precision)  # run.sharding=fsdp: shards, before the optimizers and EMA
    autocast_dtype = torch.bfloat16 if cfg.run.precision == "bf16" else None
    models = PPOModels(
        policy=policy,
        ref_policy=ref_policy,
        value_model=value_model,
        score=score_fn or reward_model_scorer(reward_model),
        logprobs=FusedHeadLogProbs() if cfg.fused_kernels else FullLogits(),
        side_by_side=runner.run,
        autocast_dtype=autocast_dtype,
    )

    prompts = load_prompt_data(
        cfg.prompts, tokenizer, cfg.generation.max_prompt_tokens, cfg.run.seed, cfg.skip_bad, cfg.sandbox_seed,
        cfg.run.world,
    )  # fmt: skip
    _check_positions(cfg, policy, prompts.ids)
    ptx = None
    if cfg.ptx.coef > 0:  # γ = 0 never reads the pretraining data
        windows = load_pretraining_windows(cfg.ptx.data, tokenizer, cfg.ptx.seq_len, cfg.run.seed + 3, cfg.skip_bad,
                                           cfg.sandbox_seed, cfg.ptx.sandbox_docs, cfg.run.world)  # fmt: skip
        micro = cfg.ptx.micro_batch_size or cfg.micro_batch_size or cfg.minibatch_size
        ptx = PretrainingMix(windows, cfg.ptx.coef, max(1, round(cfg.ptx.batch_ratio * cfg.minibatch_size)), micro)
    else:
        log_data_source("ppo", "pretraining text (ptx)", "none (ptx.coef=0)")

    fused = device.type in ("cpu", "cuda")  # the fused AdamW kernel: same update, a fraction of the time
    policy_optimizer = make_adam(policy.named_parameters(), cfg.lr, cfg.betas, 0.0, cfg.adam_eps, fused)
    value_optimizer = make_adam(value_model.named_parameters(), cfg.value_lr, cfg.betas, 0.0, cfg.adam_eps, fused)
    warmup = cfg.warmup_iterations
    policy_scheduler = torch.optim.lr_scheduler.LambdaLR(policy_optimizer, lambda it: warmup_factor(it, warmup))
    if cfg.kl.adaptive:
        kl_controller = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    else:
        kl_controller = FixedKLController(cfg.kl.coef)
    sampling = SamplingShards(cfg.generation.sampling_shards or runtime.world_size, cfg.run.seed + 2, runtime)
    training_policy, policy_optimizer = runtime.prepare(policy, policy_optimizer)
    training_value, value_optimizer = runtime.prepare(value_model, value_optimizer, forward=response_values)
    for optimizer in (policy_optimizer, value_optimizer):
        keep_dense_gradients(optimizer, kept_gradients)

    both = dict(  # the settings the actor and the critic share
        runtime=runtime,
        grad_clip=cfg.grad_clip,
        micro_batch_size=cfg.micro_batch_size or cfg.minibatch_size,
        autocast_dtype=autocast_dtype,
    )
    actor = PolicyTrainer(
        policy, training_policy, policy_optimizer, **both, scheduler=policy_scheduler, logprobs=models.logprobs,
        temperature=cfg.generation.temperature, clip_range=cfg.clip_range,
        ema=PolicyEMA(policy, cfg.ema_decay) if cfg.ema_decay is not None else None, ptx=ptx,
    )  # fmt: skip
    critic = ValueTrainer(
        value_model, training_value, value_optimizer, **both, value_clip_range=cfg.value_clip_range,
        vf_coef=cfg.vf_coef,
    )  # fmt: skip
    return PPORun(
        cfg=cfg,
        runtime=runtime,
        tokenizer=tokenizer,
        models=models,
        actor=actor,
        critic=critic,
        prompts=prompts,
        sampler=sampler or make_sampler(cfg, policy, tokenizer, runtime, runner),
        kl_controller=kl_controller,
        sampling=sampling,
        shuffle_generator=torch.Generator().manual_seed(cfg.run.seed + 1),
        nonfinite=NonFiniteGuard(cfg.run.max_nonfinite_steps, unit="iteration"),
        close=runner.close,
    )


def _sampling_states(state: dict[str, Any]) -> list[torch.Tensor]:
    """The checkpoint's sampling shards; one written before they existed kept one generator per process."""
    if "sampling_shards" in state:
        return state["sampling_shards"]
    per_process = state["sampling_generator"]
    return per_process["per_rank"] if isinstance(per_process, dict) else [per_process]


def make_sampler(cfg: Config, policy, tokenizer, runtime: Runtime, runner=None) -> GenerationBackend:
    """The rollout sampler ``generation.backend`` names: our KV-cache loop (default), HF ``generate`` or vLLM;
    under ``run.sharding=fsdp`` one of the first two, on a gathered copy or in lockstep (``sharded_sampling``)."""
    if runtime.sharded and cfg.generation.backend == "vllm":
        raise UserFacingError("generation.backend=vllm loads whole weights per GPU: use it with run.sharding=none")
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
    if runtime.sharded and cfg.sharded_sampling == "lockstep":
        if cfg.generation.backend != "cached":
            raise UserFacingError("sharded_sampling=lockstep samples with generation.backend=cached only")
        return CachedSampler(policy, tokenizer.eos_token_id, tokenizer.pad_token_id, stop=runtime.all_finished)
    if runtime.sharded:  # sharded_sampling=gathered: a full copy of the weights, synced once per iteration
        return GatheredSampler(policy, lambda copy: make_sampler(cfg, copy, tokenizer, Runtime(runtime.device)))
    if cfg.generation.backend == "hf":
        return HFGenerateBackend(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return CachedSampler(policy, tokenizer.eos_token_id, tokenizer.pad_token_id, runner=runner)


class GatheredSampler(GenerationBackend):
    """Samples from a plain full copy of a sharded policy (``sharded_sampling=gathered``): every rank gathers the
    policy's weights once per iteration (:meth:`sync_weights`) and samples its prompts on its own, with the
    sampler ``generation.backend`` names; so the ranks may stop at different steps."""

    def __init__(self, policy: torch.nn.Module, make_inner: Callable[[torch.nn.Module], GenerationBackend]):
        from instructrl.utils.sharding import gathered_state_dict, unsharded_copy

        self.copy = unsharded_copy(policy, gathered_state_dict(policy))
        self.inner = make_inner(self.copy)
        super().__init__(self.inner.eos_token_id, self.inner.pad_token_id)

    def sync_weights(self, model: torch.nn.Module) -> None:
        from instructrl.utils.sharding import gathered_state_dict

        self.copy.load_state_dict(gathered_state_dict(model))  # every rank: an all-gather

    def generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator=None):
        return self.inner.generate(prompt_ids, attention_mask, max_new_tokens, temperature, generator)


def warmup_factor(iteration: int, warmup_iterations: int, start: float = 0.1) -> float:
    """LR multiplier: linear from ``start`` to 1 over ``warmup_iterations``, then 1 (InstructGPT App. C.4)."""
    if warmup_iterations <= 0 or iteration >= warmup_iterations:
        return 1.0
    return start + (1.0 - start) * iteration / warmup_iterations


def _prepare(model: torch.nn.Module, device: torch.device, trainable: bool) -> torch.nn.Module:
    """Dropout off [ppo-details: dropout-off] and eval mode for every model; frozen models lose their gradients."""
    disable_dropout(model)
    model.eval()  # train() would only switch dropout on, and it is off: eval keeps rollout == training numerics
    model.requires_grad_(trainable)
    return model.to(device)


def _load_scalar_model(path: str, tokenizer, device: torch.device, trainable: bool):
    model = load_reward_model(path)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UserFacingError(
            f"{path} has {rows} token embeddings but the policy's tokenizer has {len(tokenizer)} tokens; "
            "the reward/value model must be built from the same tokenizer as the policy"
        )
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


def _announce(message: str) -> None:
    print(message, flush=True)
