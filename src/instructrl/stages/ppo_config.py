"""The PPO / PPO-ptx stage's settings (``instructrl ppo --help`` lists them; the loop is in :mod:`.ppo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from instructrl.config import (
    RunSettings,
    require,
    require_fraction,
    require_non_negative,
    require_own_data,
    require_path_exists,
    require_positive,
)


@dataclass
class KLSettings:
    """The per-token KL penalty β · log(π/π^SFT) in the reward."""

    coef: float = 0.02
    """β: fixed (InstructGPT 0.02, Stiennon et al. 0.05), or the starting value when ``adaptive``. On small
    policies 0.02 lets the policy exploit its reward model (the sandbox demo uses 0.1; the start-up warning of
    ``guardrails.small_policy_parameters``)."""
    adaptive: bool = False
    """Steer β toward ``target`` with Ziegler et al.'s proportional controller instead of keeping it fixed."""
    target: float = 6.0
    """Adaptive only: target KL(π ‖ π^SFT) in nats per response (Ziegler's stylistic runs: 6)."""
    horizon: float = 10000.0
    """Adaptive only: controller horizon in episodes; β changes by at most 20% × batch_size / horizon per
    iteration (Ziegler: 10,000)."""

    def validate(self) -> None:
        require_non_negative(self, "coef")
        require_positive(self, "target", "horizon")


@dataclass
class GenerationSettings:
    """How responses are sampled during rollouts (pure sampling: top_k 0, top_p 1)."""

    max_new_tokens: int = 48
    """Response length cap in tokens (paper: 1k; sandbox responses are short)."""
    temperature: float = 1.0
    """Sampling temperature T (paper 1.0); log-probs are computed from logits / T
    [ppo-details: temperature-scaled-logprobs]."""
    max_prompt_tokens: int = 192
    """Longer prompts are dropped and counted (the paper dropped prompts over 1k tokens)."""
    batch_size: int = 0
    """Prompts per ``generate`` call; 0 = the whole rollout batch at once."""
    sampling_shards: int | None = None
    """Sampling shards of the rollout batch: each samples its contiguous share of the episodes with its own seeded
    generator, so that the samples do not depend on how many processes draw them; a process samples
    sampling_shards / N of them. Must divide batch_size and be a multiple of the number of processes. Unset: the
    number of processes at the start of the run (one per process). A resumed run keeps its checkpoint's shards,
    so resuming with another number of processes (one that divides them) draws the same tokens."""
    backend: Literal["cached", "hf", "vllm"] = "cached"
    """'cached': our KV-cache sampling loop on the live policy (``instructrl.rollout.CachedSampler``: the same
    distribution as 'hf', without ``generate``'s per-step overhead); 'hf': transformers' ``generate``; 'vllm':
    a vLLM engine per GPU, weights synced after every update (GPU only, ``pip install 'instructrl[vllm]'``; see
    ``instructrl.rollout.vllm_backend``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of each GPU's memory the vLLM engine may take (the rest is for training)."""

    def validate(self) -> None:
        require_positive(self, "max_new_tokens", "temperature", "max_prompt_tokens")
        require_non_negative(self, "batch_size")
        require(
            self.sampling_shards is None or self.sampling_shards > 0,
            "generation.sampling_shards",
            f"must be > 0 or unset, got {self.sampling_shards}",
        )
        require(
            self.backend in ("cached", "hf", "vllm"),
            "generation.backend",
            f"must be 'cached', 'hf' or 'vllm', got {self.backend!r}",
        )
        require_fraction(self, "vllm_gpu_memory_utilization")


@dataclass
class PtxSettings:
    """The pretraining term γ · E_{x~D_pretrain}[log π(x)] of PPO-ptx."""

    coef: float = 2.5
    """γ; 0 = plain PPO, which never reads pretraining data. The paper's 27.8 goes with OpenAI's loss scale and
    ≈1M pretraining tokens per step (512 × 2048); here both terms are token means over ≈8k pretraining tokens
    per step (64 × 128), so the ptx gradient is √(1M/8k) ≈ 11× noisier and 27.8 / 11 ≈ 2.5 keeps the paper's
    noise-to-signal ratio. Measured at the start of PPO on a sandbox base model: ‖γ·∇ptx‖ / ‖∇PPO‖ ≈ 0.1 at
    γ = 1 (0.05–0.17 over 8 minibatches), so ≈ 0.25 at 2.5, while γ = 27.8 would make the ptx gradient 1.3–4.5×
    the PPO gradient from step one. The ptx gradient grows as the policy drifts from the pretrained model,
    which is the restoring force PPO-ptx relies on; raise γ if held-out perplexity climbs."""
    batch_ratio: float = 8.0
    """Pretraining sequences per RL episode in each optimizer step (paper: 8)."""
    data: str | None = None
    """JSONL of {text} records; unset = the corpus of the world (``run.world``, the sandbox by default; seed
    ``sandbox_seed``), which a run on your own ``prompts`` refuses (set this, or ptx.coef=0)."""
    sandbox_docs: int = 5000
    """The world's corpus documents drawn when ``data`` is unset."""
    seq_len: int = 128
    """Tokens per pretraining window (documents are joined with EOS, as in pretraining)."""
    micro_batch_size: int = 0
    """Pretraining windows per forward/backward; 0 = the top-level micro_batch_size."""

    def validate(self) -> None:
        require_non_negative(self, "coef", "micro_batch_size")
        require_positive(self, "batch_ratio", "sandbox_docs")
        require(self.seq_len >= 2, "ptx.seq_len", f"must be >= 2, got {self.seq_len}")
        require_path_exists(self, "data")


@dataclass
class GuardrailSettings:
    """Checks of every rollout for the signs that precede reward hacking, none of which needs a gold judge
    (:mod:`.ppo_guardrails`). A check whose threshold is null is off. "The SFT policy's" value is the one measured
    on iteration 1's rollout, which is sampled before the first update. A warning is printed when a check first
    fails (with the value, the iteration and what to change), flagged in metrics.jsonl (``guardrails/<check>``: 1
    on every iteration that failed it), and summarized in results.json and the eval report. The checks only
    observe: with ``stop`` false, training is the same with or without them."""

    max_kl: float | None = 20.0
    """Warn when KL(π ‖ π^SFT) per response exceeds this many nats (``objective/kl``). The collapsed runs of the
    InstructGPT defaults on small models ended at 71 nats; Ziegler's adaptive runs target 6."""
    min_entropy_ratio: float | None = 0.25
    """Warn when the policy's mean per-token entropy falls below this fraction of the SFT policy's: the policy
    is narrowing onto a few outputs."""
    min_distinct_ratio: float | None = 0.25
    """Warn when the fraction of distinct responses in a batch (``response/distinct_fraction``, distinct token
    sequences / batch_size) falls below this fraction of the SFT policy's. One output for every prompt gives
    1 / batch_size."""
    max_missing_eos_rise: float | None = 0.2
    """Warn when the share of responses without EOS exceeds the SFT policy's share by more than this (an
    absolute difference of shares): the policy writes long or looping outputs."""
    max_above_rm_range_rise: float | None = 0.25
    """Warn when the share of finished responses scoring above the highest score the reward model gave the
    responses of its validation comparisons (``score_distribution`` in the results.json that ``instructrl rm``
    writes beside the model) exceeds the SFT policy's share by more than this: the RM is scoring outputs unlike
    any it learned to rank. A relative check because the maximum of a small validation set is exceeded by some
    SFT samples already; when the SFT policy's own share exceeds this value, a note at iteration 1 says that the
    RM was not trained on samples like the policy's. Off when that file is missing or a ``score_fn`` replaces
    the reward model."""
    stop: bool = False
    """Stop the run (saving the policy, the value model and results.json as at the end) once a check has
    failed ``patience`` iterations in a row."""
    patience: int = 3
    """Iterations in a row a check must fail before ``stop`` stops the run."""
    keep_best: bool = True
    """Save ``policy_best/`` beside ``policy/``: the released weights (EMA when set) that sampled the last
    rollout before the first failed check (the last rollout, when none fails). Costs two copies of the policy's
    weights in CPU memory (and one in each checkpoint)."""
    small_policy_parameters: int = 1_000_000_000
    """At start-up, warn about a fixed β ≤ 0.02 (the paper's) on a policy with fewer parameters than this: it
    collapsed 0.94M-parameter sandbox policies (``kl_coef`` in src/instructrl/demo.py; benchmarks/RESULTS.md).
    The paper used it on 1.3B-175B policies; sizes in between are unmeasured."""

    def validate(self) -> None:
        for name in ("max_kl", "max_missing_eos_rise", "max_above_rm_range_rise"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"guardrails.{name}", f"must be >= 0 or null, got {value}")
        for name in ("min_entropy_ratio", "min_distinct_ratio"):
            value = getattr(self, name)
            ok = value is None or 0 <= value <= 1
            require(ok, f"guardrails.{name}", f"must lie in [0, 1] or be null, got {value}")
        require(self.patience > 0, "guardrails.patience", f"must be > 0, got {self.patience}")
        require(self.small_policy_parameters >= 0, "guardrails.small_policy_parameters", "must be >= 0")


@dataclass
class Config:
    """PPO / PPO-ptx training of the SFT policy against the reward model."""

    output_dir: str = "runs/sandbox/ppo"
    """Where the policy, value model, metrics, samples and checkpoints go."""
    policy: str = "runs/sandbox/sft"
    """The SFT model the policy starts from (a Hugging Face causal-LM directory)."""
    ref_policy: str | None = None
    """The frozen KL reference π^SFT; unset = ``policy`` (the paper's choice)."""
    reward_model: str = "runs/sandbox/rm"
    """The reward model (saved by ``instructrl rm``); its normalized score at the EOS is the reward."""
    value_model: str | None = None
    """Where the value function starts; unset = ``reward_model`` (InstructGPT, Stiennon et al.)
    [ppo-details: value-from-rm]."""
    value_head_init: Literal["reward", "zero"] = "reward"
    """'reward' keeps the reward model's head (paper); 'zero' zeroes it (Ziegler's code)
    [ppo-details: value-head-zero-init]."""
    prompts: str | None = None
    """JSONL of {prompt} records; unset = the world's PPO prompt pool (``run.world``; train split, disjoint from SFT
    and RM), and
    then ``ptx.data`` must be unset too: a run never mixes the sandbox's data with yours."""
    skip_bad: bool = False
    """Skip (and count) malformed prompt records instead of stopping at the first one."""
    sandbox_seed: int = 0
    """Seed of the world (``run.world``, default the sandbox) used when ``prompts`` or ``ptx.data`` is unset."""
    iterations: int = 100
    """PPO iterations (rollout + update); episodes = iterations × batch_size (paper: 256k = 500 × 512)."""
    batch_size: int = 64
    """Episodes per rollout batch (paper 512)."""
    minibatch_size: int = 8
    """Episodes per optimizer step; must divide batch_size (paper 64, i.e. 8 minibatches per batch)."""
    micro_batch_size: int = 0
    """Episodes per forward/backward (gradient accumulation); 0 = minibatch_size."""
    forward_batch_size: int = 0
    """Episodes per scoring forward pass during rollouts; 0 = micro_batch_size."""
    ppo_epochs: int = 1
    """Passes over each rollout batch, reshuffled every pass (paper 1)."""
    lr: float = 1e-4
    """Policy learning rate after warmup (paper: swept 2.55e-6 … 2.55e-5 at 1.3B/6B; tiny models need more)."""
    value_lr: float = 1e-4
    """Value-function learning rate, constant (paper 9e-6 at 1.3B/6B)."""
    warmup_iterations: int = 10
    """Policy LR warms up linearly from lr/10 over this many iterations, then stays constant (paper 10)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2 (paper)."""
    adam_eps: float = 1e-5
    """Adam ε (N+ and TRL use 1e-5) [ppo-details: adam-eps]."""
    grad_clip: float = 1.0
    """Gradient-norm clip for each of policy and value (0 disables)."""
    gamma: float = 1.0
    """Discount γ of GAE (paper: 1, no discounting)."""
    lam: float = 0.95
    """GAE λ."""
    clip_range: float = 0.2
    """PPO ratio clip ε (paper 0.2)."""
    value_clip_range: float = 0.2
    """Value-loss clip around the rollout values [ppo-details: value-clipping]."""
    vf_coef: float = 0.1
    """Weight of the value loss (the value network has its own optimizer, so this mostly scales its gradient)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch without re-centring
    [ppo-details: reward-whitening]."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch [ppo-details: advantage-whitening]."""
    missing_eos_score: float | None = -1.0
    """Score given to responses that never emit EOS [ppo-details: eos-trick]; null keeps the RM score. Pick
    it below typical RM scores (the sandbox RM is normalized to mean 0 on demonstrations)."""
    ema_decay: float | None = 0.992
    """EMA decay of the policy weights per optimizer step (paper 0.992) [ppo-details: policy-ema]; the released
    policy is the EMA. null releases the live weights. With few optimizer steps the EMA lags far behind the live
    policy."""
    kl: KLSettings = field(default_factory=KLSettings)
    """KL penalty."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Rollout sampling."""
    ptx: PtxSettings = field(default_factory=PtxSettings)
    """Pretraining mix (PPO-ptx)."""
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)
    """Warnings (and optionally an early stop) when the rollouts show the signs of reward hacking."""
    sample_every: int = 10
    """Iterations between printed tables of sample generations (also appended to samples.jsonl); 0 = never."""
    num_samples: int = 4
    """Episodes per sample table."""
    save_every: int = 20
    """Iterations between resumable checkpoints."""
    save_policy_every: int = 0
    """Iterations between Hugging Face snapshots ``policy-iter-XXXX`` of the released policy; 0 = none."""
    fused_kernels: bool = True
    """Compute the same math with faster kernels (``instructrl.fast``): log-probs through the fused LM head
    (no full-vocabulary logits), GPT-2's ``gelu_new`` as one tanh-GELU kernel, SDPA attention in float32
    under bf16 on a CPU (where PyTorch's bf16 attention kernel is slower), the policy's LM head computed as
    (W · hᵀ)ᵀ for the sampler's few rows on a CPU in float32, and (one process only) embedding gradients
    without a fresh (vocab × d) buffer per step: the policy's tied embedding and its fused LM head add their
    gradients straight into a ``.grad`` kept between steps, the value model's embedding sends sparse rows into
    one. Results agree with false up to float rounding (tested); false runs the models exactly as loaded and
    computes log-probs from their full logits."""
    overlap_models: bool | Literal["auto"] = "auto"
    """On a CPU, in one process, with 2+ torch threads: run the policy's work and the value model's work at the
    same time on two threads, each with half of the intra-op threads (``instructrl.fast.overlap``): in each
    minibatch the policy's step (gradients, ptx, clipping, optimizer step, EMA) beside the value model's, in
    the rollout the policy + reference forwards beside the value forward + scoring, and (with the default
    'cached' sampler) the two halves of the rollout batch sampled at once (every row has its own uniforms, so
    the tokens do not change). The side that finishes first hands its threads to the other, which picks them
    up between decoder layers. The two share nothing, so the math is the same; results agree with false up to
    float rounding (a kernel split over another number of threads may add in another order; with the
    hand-over that number depends on timing, so only false is bitwise repeatable). It pays for small models,
    whose elementwise kernels scale poorly over threads, and, with the hand-over, where the policy's side is
    heavier (a large-vocabulary LM head); it can cost where one side is much heavier (measurements:
    benchmarks/RESULTS.md). 'auto' times the first calls each way in every process and keeps the faster
    (logged). Ignored on a GPU and under N processes."""
    sharded_sampling: Literal["gathered", "lockstep"] = "gathered"
    """Under ``run.sharding=fsdp`` ('cached' and 'hf' backends): 'gathered' gathers the policy's full weights
    into a plain copy on every process once per iteration (one more policy's weights per process, in the
    weights' dtype) and each process samples its prompts on its own; 'lockstep' samples on the sharded policy
    itself, every decoding step a collective (no full copy, much slower), the processes stopping together when
    every one's responses have ended. Both draw the same tokens as an unsharded run with the same seeds."""
    frozen_models: Literal["sharded", "full"] = "sharded"
    """Under ``run.sharding=fsdp``, how each process holds the frozen reference policy and reward model:
    'sharded' (1/N of their weights each, no optimizer; their forwards are collectives) or 'full' (a whole copy
    each, as without sharding: 4 bytes per parameter in float32, 2 in bf16; memory table in README 'Scaling
    up'). The trained policy and value model are always sharded."""
    run: RunSettings = field(default_factory=RunSettings)
    """Seed, threads, device, precision, resume, TensorBoard and the non-finite-step limit (shared by every stage).
    ``run.precision=bf16`` autocasts generation and every forward pass, rollout and training."""

    def validate(self) -> None:
        require_positive(self, "iterations", "batch_size", "minibatch_size", "ppo_epochs", "lr", "value_lr")
        require_positive(self, "save_every")
        require_non_negative(self, "micro_batch_size", "forward_batch_size", "warmup_iterations", "grad_clip")
        require_non_negative(self, "clip_range", "value_clip_range", "vf_coef", "sample_every", "num_samples")
        require_non_negative(self, "save_policy_every")
        require_fraction(self, "gamma", "lam")
        require_positive(self, "adam_eps")
        # model directories are checked when the run starts (a pipeline may build this config before SFT/RM ran)
        require_path_exists(self, "prompts")
        require_own_data(self, "prompts", ["ptx.data"])
        if self.ptx.coef > 0:
            require_own_data(self, "ptx.data", ["prompts"], off="ptx.coef=0")
        require(
            self.batch_size % self.minibatch_size == 0,
            "minibatch_size",
            f"must divide batch_size={self.batch_size}",
        )
        shards = self.generation.sampling_shards
        require(
            shards is None or self.batch_size % shards == 0,
            "generation.sampling_shards",
            f"must divide batch_size={self.batch_size}",
        )
        micro = self.micro_batch_size or self.minibatch_size
        require(
            self.minibatch_size % micro == 0, "micro_batch_size", f"must divide minibatch_size={self.minibatch_size}"
        )
        require(
            self.sharded_sampling in ("gathered", "lockstep"),
            "sharded_sampling",
            f"must be 'gathered' or 'lockstep', got {self.sharded_sampling!r}",
        )
        require(
            self.frozen_models in ("sharded", "full"),
            "frozen_models",
            f"must be 'sharded' or 'full', got {self.frozen_models!r}",
        )
        require(
            self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", f"must lie in (0, 1), got {self.ema_decay}"
        )
