"""PPO iteration throughput: instructrl's PPO stage against TRL 0.29.1's ``trl.experimental.ppo.PPOTrainer``.

Run (after ``pip install -e '.[bench]'``)::

    python benchmarks/ppo_throughput.py                 # both shapes, 2 threads, 3 timed iterations each
    python benchmarks/ppo_throughput.py --shapes S1 --iterations 5 --threads 2
    python benchmarks/ppo_throughput.py --shapes S1 --rounds 3 --precisions fp32,fp32:plain   # A/B, drift-robust
    python benchmarks/ppo_throughput.py --device cuda --peer-precisions fp32,bf16   # on a GPU

``--rounds N`` runs every side N times, alternating the order, pools the timed iterations and prints each
round's ratio: this VM's speed drifts by 10-20% within minutes, more than many single changes are worth.
A precision with ``:plain`` runs our PPO with ``fused_kernels=false`` (see ``instructrl.fast.kernels``), one
with ``:sequential`` with ``overlap_models=false`` (``instructrl.fast.overlap``); ``:plain+sequential`` both.

``--device cuda`` runs every side on the GPU (``device=cuda`` for ours, ``use_cpu=False`` for TRL), times
with ``torch.cuda.synchronize()`` at every clock reading, measures the matmul peak on the GPU, and reports the
GPU's peak allocated memory (``torch.cuda.max_memory_allocated``) instead of the resident set.
``--peer-precisions fp32,bf16`` adds a TRL run with ``bf16=True`` (accelerate's autocast), the like-for-like
peer of our bf16; the ratio column stays against the peer's fp32, and a line per precision gives the ratio
against the peer at the same precision.

Both sides get the same randomly initialized models (policy, frozen reference, reward model, value model of
the same architecture; the value model starts from the reward model), the same 16-token prompts, the same
tokenizer (trained in-process) and the same algorithm settings: pure sampling at temperature 1 with EOS as
the stop token and a missing-EOS penalty, β = 0.05 (k1 in the reward), GAE γ = 1, λ = 0.95, advantage
whitening, ratio clip 0.2, value clip 0.2, vf_coef 0.1, ``epochs`` × ``minibatches`` optimizer steps per
iteration with no gradient accumulation, no gradient clipping and no EMA (TRL's PPO has neither), no
gradient checkpointing, dropout off, rollout forwards in one batch of the whole rollout.

Each measurement runs in its own subprocess (``--worker``) with ``torch.set_num_threads(threads)``, so the
sides cannot share caches, allocator state or thread pools, and each one's peak memory is its own.

What is printed, per shape:
  * s/iter: median wall seconds of one PPO iteration (rollout + update) after ``--warmup`` iterations;
    samples/s = batch / s/iter; ratio = ours / peer fp32.
  * split: our time in generation (``run.sampler``'s ``generate`` calls), scoring (the rest of
    ``train_iteration``'s steps 1-3: the four rollout forwards, rewards, advantages; its ``time/rollout``
    minus generation) and training (the rest of the iteration: the PPO epochs and step 5).
  * peak RSS: the resident-set high-water mark (``VmHWM``) over the timed iterations, reset just before the
    first iteration through ``/proc/self/clear_refs`` (Linux); "+work" is that peak minus the resident set at
    the reset (models, optimizers and imports already loaded), i.e. what the iterations themselves add. On a
    system without ``clear_refs`` the process-lifetime ``ru_maxrss`` is reported instead.
  * FLOP/s and utilization: FLOPs counted by :func:`iteration_flops` (below) per phase, divided by the
    phase's time, as a fraction of this machine's matmul peak measured by :func:`matmul_peak` (best of a few
    large square ``torch.mm`` calls in fp32 and bf16 with the same thread count).

FLOP count (matmuls only; norms, activations, softmax and the optimizer are not counted):
    a forward over T positions of a model with L layers, width d, MLP parameter count m per layer, attention
    over a context of T, and an LM head (tied or not) applied at H positions costs

        2·T·L·(4d² + m) + 4·L·T²·d·(1/2 causal ≈ counted in full here: 4·L·T²·d) + 2·H·d·V

    (the 4d² is Q, K, V and O; m = 2·d·d_ff for GPT-2, 3·d·d_ff for Llama's SwiGLU). A backward pass costs
    twice its forward. Scalar heads (reward, value) cost 2·T·d and are ignored. The count is the minimal
    one for the algorithm (LM head only at response positions); it is the same number for both sides, so
    the peer's FLOP/s is simply ours scaled by the time ratio.
    Generation: prefill of Q prompt tokens (LM head at 1 position) and R − 1 decode steps of one token
    attending over the cache (LM head at every step).
    Scoring: policy and reference forwards over Q + R positions with the LM head at R positions; reward and
    value forwards over Q + R positions without LM head.
    Training: per epoch, the policy (LM head at R) and the value model forward + backward over the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: model architecture and PPO batch geometry."""

    name: str
    arch: str
    """'gpt2' or 'llama' (``instructrl.models.causal_lm.ModelSpec.arch``)."""
    n_layers: int
    d_model: int
    n_heads: int
    vocab: int
    """Vocabulary size of the models; the in-process tokenizer is trained toward it and the embeddings are
    resized to exactly this size."""
    batch: int
    """Prompts (episodes) per PPO iteration."""
    prompt_len: int
    """Tokens per prompt (all prompts have this length, so no side pads them)."""
    response_len: int
    """Maximum response tokens."""
    epochs: int = 4
    minibatches: int = 4

    @property
    def d_ff(self) -> int:
        # ModelSpec's defaults: 4·d for GPT-2, 8/3·d rounded to a multiple of 32 for Llama
        return 4 * self.d_model if self.arch == "gpt2" else int(round(self.d_model * 8 / 3 / 32) * 32)


SHAPES = {
    "S1": Shape("S1", "gpt2", n_layers=4, d_model=256, n_heads=4, vocab=512,
                batch=64, prompt_len=16, response_len=48),
    "S2": Shape("S2", "llama", n_layers=6, d_model=512, n_heads=8, vocab=32000,
                batch=32, prompt_len=16, response_len=32),
    # smoke-test size (tests/test_benchmark.py): seconds per iteration, same code paths
    "tiny": Shape("tiny", "llama", n_layers=1, d_model=32, n_heads=2, vocab=300, batch=8, prompt_len=4, response_len=6,
                  epochs=1, minibatches=2),
}  # fmt: skip

KL_COEF = 0.05
MISSING_EOS_PENALTY = 1.0
"""TRL subtracts this from the score of a response without EOS; we set our ``missing_eos_score`` to −1 (a
replacement, not a subtraction: same cost, and both exercise the rule)."""
LR = 1e-5
VARIANTS = {"plain": "fused_kernels=false", "sequential": "overlap_models=false"}
OVERLAP_WORDS = {"overlap": "at once", "sequential": "one after the other"}
"""``--precisions`` suffixes (``fp32:plain``, ``bf16:plain+sequential``): our PPO with an optimization off."""


# --------------------------------------------------------------------------- FLOP count


def forward_flops(shape: Shape, positions: int, context: int, lm_head_positions: int, batch: int) -> float:
    """Matmul FLOPs of one forward of ``batch`` sequences: ``positions`` new positions per sequence attending
    over ``context`` positions, LM head at ``lm_head_positions`` per sequence (see the module docstring)."""
    d, layers = shape.d_model, shape.n_layers
    mlp = (2 if shape.arch == "gpt2" else 3) * d * shape.d_ff
    dense = 2 * positions * layers * (4 * d * d + mlp)
    attention = 4 * layers * positions * context * d  # QKᵀ and attention·V
    head = 2 * lm_head_positions * d * shape.vocab
    return batch * (dense + attention + head)


def iteration_flops(shape: Shape, response_len: int | None = None) -> dict[str, float]:
    """FLOPs of one PPO iteration per phase, for responses of ``response_len`` tokens (default: the maximum)."""
    q, r, b = shape.prompt_len, response_len or shape.response_len, shape.batch
    t = q + r
    prefill = forward_flops(shape, q, q, 1, b)
    decode = sum(forward_flops(shape, 1, q + k, 1, b) for k in range(1, r))
    lm = forward_flops(shape, t, t, r, b)
    trunk = forward_flops(shape, t, t, 0, b)
    return {
        "generation": prefill + decode,
        "scoring": 2 * lm + 2 * trunk,
        "training": shape.epochs * 3 * (lm + trunk),  # forward + backward (2× forward)
    }


def matmul_peak(dtype_name: str, seconds: float = 3.0, device: str = "cpu") -> float:
    """Best FLOP/s of square ``torch.mm`` calls in ``dtype_name`` (sizes 512…2048 on this process's CPU
    threads; 2048…8192 on a GPU, synchronized before each clock reading); larger sizes are skipped once
    ``seconds`` have passed."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best, began = 0.0, time.perf_counter()
    for n in (512, 1024, 2048) if device == "cpu" else (2048, 4096, 8192):
        if best and time.perf_counter() - began > seconds:  # e.g. bf16 in software: ~1 GFLOP/s, 17 s per 2048³
            break
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (oneDNN primitive creation / cuBLAS handle and heuristics)
        synchronize(device)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            calls += 1
            if calls % 8 == 0:
                synchronize(device)
        synchronize(device)
        best = max(best, 2 * n**3 * calls / (time.perf_counter() - start))
    return best


def default_precisions(device: str, native_bf16: bool) -> str:
    """Our precisions when ``--precisions`` is not given: bf16 only where matmuls run it natively."""
    return "fp32" if device == "cpu" and not native_bf16 else "fp32,bf16"


def describe_cpu() -> dict:
    """This machine's CPU as torch sees it: model name (with family/model numbers, which tell a Zen 3 from a
    Zen 4 where the name is only 'AMD EPYC'), the vector ISA of torch's kernels, and native bf16 matmuls."""
    import torch

    from instructrl.stages.common import cpu_has_native_bf16

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the name alone
        pass
    model = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock reading includes it (nothing to do on a CPU)."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- memory


def reset_peak_memory(device: str) -> tuple[float, bool]:
    """Reset the peak-memory mark: the RSS high-water mark on a CPU, the allocator's peak on a GPU; returns the
    memory in use now (MiB) and whether the reset worked."""
    if device == "cpu":
        return reset_peak_rss()
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20, True


def peak_memory_mib(device: str, reset_worked: bool) -> float:
    """The peak since :func:`reset_peak_memory`: RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU."""
    if device == "cpu":
        return peak_rss_mib(reset_worked)
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak_rss() -> tuple[float, bool]:
    """Reset the RSS high-water mark (Linux ``clear_refs``); returns (current RSS in MiB, whether it worked)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS"), True
    except OSError:
        return _status_mib("VmRSS"), False


def peak_rss_mib(reset_worked: bool) -> float:
    """The RSS high-water mark in MiB since the reset (or over the process lifetime)."""
    if reset_worked:
        return _status_mib("VmHWM")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


# --------------------------------------------------------------------------- shared assets


def build_assets(shape: Shape, root: Path, seed: int = 0) -> dict:
    """Tokenizer, a causal LM (policy and reference), a reward model (reward and value) and prompt ids, saved
    under ``root``; identical for both sides because both load them from these directories."""
    import torch

    from instructrl.models.causal_lm import ModelSpec, build_causal_lm
    from instructrl.models.reward import reward_model_from_causal_lm
    from instructrl.models.tokenizer import train_bpe_tokenizer
    from instructrl.sandbox import SandboxWorld

    texts = SandboxWorld(seed=seed).pretraining_corpus(2000 if shape.vocab > 1000 else 300)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=min(shape.vocab, 8000))
    torch.manual_seed(seed)
    spec = ModelSpec(arch=shape.arch, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
                     max_seq_len=max(128, shape.prompt_len + shape.response_len), tie_embeddings=True)  # fmt: skip
    model = build_causal_lm(spec, tokenizer)
    model.resize_token_embeddings(shape.vocab, mean_resizing=False)
    lm_dir, rm_dir = root / "lm", root / "rm"
    model.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    rm = reward_model_from_causal_lm(lm_dir, tokenizer.pad_token_id)
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    # prompts: windows of exactly prompt_len ordinary tokens (no specials), cut from the corpus
    special = set(tokenizer.all_special_ids)
    stream = [i for ids in tokenizer(texts[:200], add_special_tokens=False)["input_ids"] for i in ids]
    stream = [i for i in stream if i not in special]
    prompts = [stream[k * shape.prompt_len : (k + 1) * shape.prompt_len] for k in range(shape.batch)]
    assert all(len(p) == shape.prompt_len for p in prompts), "corpus too short for the prompts"
    return {"lm_dir": str(lm_dir), "rm_dir": str(rm_dir), "prompts": prompts}


# --------------------------------------------------------------------------- our side


class TimedBackend:
    """Wraps a rollout sampler and adds up the seconds spent in ``generate``."""

    def __init__(self, inner, device: str = "cpu"):
        self.inner = inner
        self.device = device
        self.seconds = 0.0

    def generate(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            return self.inner.generate(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.seconds += time.perf_counter() - start

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)


def run_ours(
    shape: Shape, assets: dict, precision: str, iterations: int, warmup: int, out_dir: Path, device: str = "cpu"
) -> dict:
    """Time ``train_iteration`` of instructrl's PPO stage (the code ``instructrl ppo`` runs)."""
    import torch

    from instructrl.config import load_config
    from instructrl.stages import ppo
    from instructrl.stages.ppo_build import build_run
    from instructrl.stages.ppo_data import PromptData, PromptSampler

    prompts_file = out_dir / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "placeholder"}\n')  # replaced by the exact token ids below
    minibatch = shape.batch // shape.minibatches
    overrides = [
        f"output_dir={out_dir / 'run'}",
        f"policy={assets['lm_dir']}",
        f"reward_model={assets['rm_dir']}",
        f"prompts={prompts_file}",
        f"iterations={warmup + iterations}",
        f"batch_size={shape.batch}",
        f"minibatch_size={minibatch}",
        f"micro_batch_size={minibatch}",
        f"forward_batch_size={shape.batch}",
        f"ppo_epochs={shape.epochs}",
        f"generation.max_new_tokens={shape.response_len}",
        "generation.temperature=1.0",
        f"kl.coef={KL_COEF}",
        f"lr={LR}",
        f"value_lr={LR}",
        "warmup_iterations=0",
        "grad_clip=0",
        "ema_decay=null",
        "missing_eos_score=-1.0",
        "ptx.coef=0",
        "sample_every=0",
        "run.resume=false",
        f"run.device={device}",
    ]
    precision, _, variants = precision.partition(":")  # e.g. "fp32:plain" = fp32 without the kernel swaps
    if precision != "fp32":
        overrides.append(f"run.precision={precision}")
    for variant in filter(None, variants.split("+")):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r} of precision {precision!r}; expected one of {VARIANTS}")
        overrides.append(VARIANTS[variant])
    cfg = load_config(ppo.Config, overrides=overrides)
    run = build_run(cfg)
    sampler = TimedBackend(run.sampler, device)  # the run's own sampler (with its runner), timed
    run.sampler = sampler
    ids = [list(p) for p in assets["prompts"]]
    run.prompts = PromptData(texts=[""] * len(ids), ids=ids, order=PromptSampler(len(ids), seed=0))

    rows = []
    memory_before, reset_worked = 0.0, False
    try:
        for k in range(warmup + iterations):
            if k == warmup:
                memory_before, reset_worked = reset_peak_memory(device)
            sampler.seconds = 0.0
            synchronize(device)
            start = time.perf_counter()
            metrics, _, _ = ppo.train_iteration(run)
            synchronize(device)
            total = time.perf_counter() - start
            rows.append(
                {
                    "total": total,
                    "generation": sampler.seconds,
                    "scoring": metrics["time/rollout"] - sampler.seconds,  # steps 1-3 less the sampler
                    "training": total - metrics["time/rollout"],  # the rest: steps 4-5
                    "response_len": metrics["response/length"],
                }
            )
        runner = run.models.side_by_side.__self__  # overlap_models: what ran (auto's choice, once made)
        overlap = getattr(runner, "chosen", None) or ("overlap" if runner.concurrent else "sequential")
    finally:
        run.close()  # overlap_models' worker threads
    del torch
    return {"iterations": rows[warmup:], "rss_before_mib": memory_before,
            "peak_rss_mib": peak_memory_mib(device, reset_worked), "peak_reset": reset_worked,
            "overlap": overlap}  # fmt: skip


# --------------------------------------------------------------------------- the peer


def run_peer(
    shape: Shape,
    assets: dict,
    iterations: int,
    warmup: int,
    out_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict:
    """Time TRL 0.29.1's ``PPOTrainer.train`` iterations (one iteration = one ``on_step_end``)."""
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"the peer runs fp32 or bf16, not {precision!r}")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(assets["lm_dir"])
    policy = AutoModelForCausalLM.from_pretrained(assets["lm_dir"])
    ref_policy = AutoModelForCausalLM.from_pretrained(assets["lm_dir"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(assets["rm_dir"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(assets["rm_dir"], num_labels=1)
    dataset = Dataset.from_dict({"input_ids": [list(p) for p in assets["prompts"]]})
    minibatch = shape.batch // shape.minibatches
    args = PPOConfig(
        output_dir=str(out_dir / "peer"),
        # one optimizer step per minibatch, no accumulation: the whole rollout batch is one "device batch"
        # cut into num_mini_batches minibatches of batch / num_mini_batches episodes
        per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=shape.minibatches,
        num_ppo_epochs=shape.epochs,
        local_rollout_forward_batch_size=shape.batch,
        total_episodes=shape.batch * (warmup + iterations),
        response_length=shape.response_len,
        stop_token="eos",
        missing_eos_penalty=MISSING_EOS_PENALTY,
        temperature=1.0,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        num_sample_generations=0,
        gradient_checkpointing=False,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        seed=0,
    )
    assert minibatch * shape.minibatches == shape.batch

    stamps: list[float] = []
    steps = {"optimizer": 0}
    memory = {"before": 0.0, "reset": False}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            stamps.append(time.perf_counter())
            if len(stamps) == warmup:
                memory["before"], memory["reset"] = reset_peak_memory(device)

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
        callbacks=[Clock()],
    )

    def count_step(*_):
        steps["optimizer"] += 1

    trainer.optimizer.optimizer.register_step_post_hook(count_step)
    synchronize(device)
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    expected_steps = (warmup + iterations) * shape.epochs * shape.minibatches
    if steps["optimizer"] != expected_steps:
        raise RuntimeError(f"TRL made {steps['optimizer']} optimizer steps, expected {expected_steps}")
    del torch
    return {"iterations": [{"total": t} for t in times[warmup:]], "rss_before_mib": memory["before"],
            "peak_rss_mib": peak_memory_mib(device, memory["reset"]), "peak_reset": memory["reset"]}  # fmt: skip


# --------------------------------------------------------------------------- generation micro-benchmark


def run_generation(shape: Shape, assets: dict, repeats: int, device: str = "cpu") -> dict:
    """Our rollout sampler vs ``model.generate`` on the same policy and prompts (tokens/s, median of repeats).

    All start from the same generator seed and take turns (a warm-up turn, then ``repeats`` timed ones); tokens/s
    counts the tokens produced up to and including EOS.
    On a CPU with 2+ threads a third line, "ours, halves", samples the two halves of the batch at once on two
    threads, as PPO's rollouts do when ``overlap_models`` chooses to overlap."""
    import torch

    from instructrl.fast.kernels import few_rows_cpu_lm_head
    from instructrl.fast.overlap import OverlapRunner, add_claim_points
    from instructrl.fast.sampler import CachedSampler
    from instructrl.models.causal_lm import disable_dropout, load_causal_lm, load_tokenizer
    from instructrl.rollout.sampler import HFGenerateBackend

    tokenizer = load_tokenizer(assets["lm_dir"])
    model = load_causal_lm(assets["lm_dir"], tokenizer).to(device)
    disable_dropout(model)
    few_rows_cpu_lm_head(model)  # as the PPO run's policy (fused_kernels): both samplers share the model
    model.eval().requires_grad_(False)
    query = torch.tensor(assets["prompts"], device=device)
    mask = torch.ones_like(query)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    samplers = {"model.generate": HFGenerateBackend(model, eos, pad), "ours": CachedSampler(model, eos, pad)}
    threads = torch.get_num_threads()
    overlap = OverlapRunner(threads) if device == "cpu" and threads >= 2 else None
    if overlap is not None:  # what PPO runs when overlap_models chooses to overlap: the two halves at once
        add_claim_points(model)
        samplers["ours, halves"] = CachedSampler(model, eos, pad, runner=overlap)
    generators = {name: torch.Generator(device=device).manual_seed(0) for name in samplers}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    tokens: dict[str, list[int]] = {name: [] for name in samplers}
    for repeat in range(repeats + 1):  # the samplers take turns, so the machine's drift reaches each alike
        for name, sampler in samplers.items():
            synchronize(device)
            start = time.perf_counter()
            response = sampler.generate(query, mask, shape.response_len, 1.0, generators[name])
            synchronize(device)
            if repeat > 0:  # the first turn is a warm-up
                times[name].append(time.perf_counter() - start)
                tokens[name].append(int((response != tokenizer.pad_token_id).sum()))
    out = {}
    for name in samplers:
        k = times[name].index(statistics.median(times[name])) if repeats % 2 else 0
        seconds = statistics.median(times[name])
        out[name] = {"seconds": seconds, "tokens": tokens[name][k], "tokens_per_s": tokens[name][k] / times[name][k]}
    if overlap is not None:
        overlap.close()
    return out


# --------------------------------------------------------------------------- orchestration


def worker_main(ns: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(ns.threads)
    shape = SHAPES[ns.shape]
    assets = json.loads(Path(ns.assets).read_text()) if ns.assets else {}
    with tempfile.TemporaryDirectory() as tmp:
        if ns.worker == "ours":
            result = run_ours(shape, assets, ns.precision, ns.iterations, ns.warmup, Path(tmp), ns.device)
        elif ns.worker == "peer":
            result = run_peer(shape, assets, ns.iterations, ns.warmup, Path(tmp), ns.device, ns.precision)
        elif ns.worker == "generation":
            result = run_generation(shape, assets, ns.iterations, ns.device)
        elif ns.worker == "peak":
            result = {p: matmul_peak(p, ns.peak_seconds, ns.device) for p in ("fp32", "bf16")}
        else:
            raise SystemExit(f"unknown worker {ns.worker}")
    print("RESULT " + json.dumps(result), flush=True)


def spawn(worker: str, ns: argparse.Namespace, shape: str = "S1", assets: str = "", precision: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--shape", shape, "--assets", assets,
           "--precision", precision, "--threads", str(ns.threads), "--iterations", str(ns.iterations),
           "--warmup", str(ns.warmup), "--peak-seconds", str(ns.peak_seconds), "--device", ns.device]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads), "MKL_NUM_THREADS": str(ns.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"worker {worker} {shape} {precision} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def merge_rounds(rounds: list[dict]) -> dict:
    """One result per side from ``--rounds`` runs: every timed iteration pooled (the median is taken over all of
    them), the highest peak memory, and each round's own median s/iter kept for the ratio's spread."""
    merged = {}
    for label in rounds[0]:
        results = [r[label] for r in rounds]
        worst = max(results, key=lambda r: r["peak_rss_mib"])
        merged[label] = {
            **worst,
            "iterations": [row for r in results for row in r["iterations"]],
            "round_totals": [summarize(r["iterations"])["total"] for r in results],
            "overlap_rounds": [r.get("overlap") for r in results],
        }
    return merged


def summarize(rows: list[dict]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="S1,S2", help="comma-separated: S1, S2 (tiny = smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every worker")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every side this many times, alternating the order; the ratio's "
        "min-max over rounds is printed (this VM drifts by up to ~20%% between runs)",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="our precisions (the peer runs fp32); append :plain (no fused_kernels), :sequential "
        "(no overlap_models), or :plain+sequential. Default fp32,bf16; fp32 alone on a CPU without native "
        "bf16 matrix multiplies (bf16 would run in software there)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip TRL (e.g. when it is not installed)")
    parser.add_argument(
        "--peer-precisions",
        default="fp32",
        help="the peer's precisions, fp32 first (bf16 = TRL with bf16=True); the ratio column is against fp32",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every side runs")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring the matmul peak")
    # internal: one measurement in a subprocess
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="S1", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.rounds < 1:
        parser.error("--rounds must be at least 1")
    peers = ns.peer_precisions.split(",")
    if peers[0] != "fp32" or not set(peers) <= {"fp32", "bf16"}:
        parser.error("--peer-precisions: fp32 first, then optionally bf16 (the ratio column is against fp32)")
    if ns.worker:
        worker_main(ns)
        return {}

    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    where = f"{ns.threads} threads" if ns.device == "cpu" else f"{torch.cuda.get_device_name()}, {ns.threads} threads"
    report: dict = {"threads": ns.threads, "device": ns.device, "torch": torch.__version__, "shapes": {}}
    per_round = f" in each of {ns.rounds} rounds" if ns.rounds > 1 else ""
    print(f"instructrl PPO vs TRL PPOTrainer: torch {torch.__version__}, {where}, "
          f"median of {ns.iterations} iterations after {ns.warmup} warm-up{per_round}", flush=True)  # fmt: skip
    if ns.device == "cpu":
        report["cpu"] = describe_cpu()
        print(f"cpu: {report['cpu']['model']}, torch kernels {report['cpu']['capability']}, "
              f"native bf16 matmul {'yes' if report['cpu']['native_bf16'] else 'no'}")  # fmt: skip
    if ns.precisions is None:
        ns.precisions = default_precisions(ns.device, report.get("cpu", {}).get("native_bf16", True))
        if "bf16" not in ns.precisions:
            print("bf16 left out: this CPU has no native bf16 matrix multiply (AVX512-BF16 or AMX), so PyTorch "
                  "would multiply bf16 in software (--precisions fp32,bf16 runs it anyway)")  # fmt: skip
    peak = spawn("peak", ns)
    report["matmul_peak"] = peak
    print(f"measured matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    peer_precisions = [p for p in ns.peer_precisions.split(",") if p] if not ns.no_peer else []
    precisions = [p for p in ns.precisions.split(",") if p]
    for name in ns.shapes.split(","):
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(ns.threads)
            assets = build_assets(shape, Path(tmp))
            assets_file = Path(tmp) / "assets.json"
            assets_file.write_text(json.dumps(assets))
            runs = [(f"peer {p}", "peer", p) for p in peer_precisions]
            runs += [(f"ours {precision}", "ours", precision) for precision in precisions]
            rounds: list[dict] = []
            for index in range(ns.rounds):  # the order alternates so that a drift of the machine hits both sides
                order = runs if index % 2 == 0 else runs[::-1]
                rounds.append({label: spawn(worker, ns, name, str(assets_file), p) for label, worker, p in order})
            sides = merge_rounds(rounds)
            generation = spawn("generation", ns, name, str(assets_file))
        report["shapes"][name] = {"shape": asdict(shape), "sides": sides, "generation": generation}
        print_shape(shape, sides, generation, peak, ns.device)
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2))
    return report


def print_shape(shape: Shape, sides: dict, generation: dict, peak: dict, device: str = "cpu") -> None:
    peer = summarize(sides["peer fp32"]["iterations"])["total"] if "peer fp32" in sides else None
    print(f"\n{shape.name}: {shape.arch}, {shape.n_layers} layers, width {shape.d_model}, {shape.n_heads} heads, "
          f"vocab {shape.vocab}; batch {shape.batch} × ({shape.prompt_len} prompt + ≤{shape.response_len} response) "
          f"tokens; {shape.epochs} epochs × {shape.minibatches} minibatches")  # fmt: skip
    width = max(16, *(len(side) for side in sides))  # "ours bf16:plain+sequential" is longer than 16
    header = f"{'side':<{width}} {'s/iter':>7} {'ratio':>6} {'samples/s':>9}  {'gen / score / train (s)':<24} " \
             f"{'peak RSS (+work) MiB' if device == 'cpu' else 'peak GPU (+work) MiB':>21}  " \
             f"{'train FLOP/s (util fp32)':>24}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for side, result in sides.items():
        s = summarize(result["iterations"])
        ratio = f"{s['total'] / peer:6.2f}" if peer else "     -"
        split = f"{s['generation']:.2f} / {s['scoring']:.2f} / {s['training']:.2f}" if "training" in s else "-"
        mem = f"{result['peak_rss_mib']:.0f} (+{result['peak_rss_mib'] - result['rss_before_mib']:.0f})"
        flops = iteration_flops(shape, round(s["response_len"]) if "response_len" in s else None)
        if "training" in s:
            achieved = flops["training"] / s["training"]
            util = f"{achieved / 1e9:.1f} G ({achieved / peak['fp32']:.0%})"
        else:
            util = f"{sum(flops.values()) / s['total'] / 1e9:.1f} G (whole iter)"
        print(f"{side:<{width}} {s['total']:7.2f} {ratio} {shape.batch / s['total']:9.1f}  {split:<24} {mem:>21}  "
              f"{util:>24}")  # fmt: skip
    for side, result in sides.items():  # like for like: ours at a precision against the peer at the same one
        precision = side.removeprefix("ours ").partition(":")[0]  # "bf16:plain" is compared with the peer's bf16
        if side.startswith("ours ") and precision != "fp32" and f"peer {precision}" in sides:
            theirs = summarize(sides[f"peer {precision}"]["iterations"])["total"]
            print(f"{side} vs peer {precision}: ratio {summarize(result['iterations'])['total'] / theirs:.2f}")
    if peer and len(sides["peer fp32"].get("round_totals", [])) > 1:
        peer_rounds = sides["peer fp32"]["round_totals"]
        for side, result in sides.items():
            if side != "peer fp32":
                ratios = [ours / theirs for ours, theirs in zip(result["round_totals"], peer_rounds)]
                print(f"{side}: ratio per round {' '.join(f'{r:.2f}' for r in ratios)} "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    for side, result in sides.items():  # overlap_models=auto chooses per run: say what each round ran
        modes = result.get("overlap_rounds") or [result.get("overlap")]
        if side.startswith("ours ") and any(modes):
            print(f"{side}: policy and value work {', '.join(OVERLAP_WORDS.get(m, str(m)) for m in modes)}")
    base = generation.get("model.generate")
    for name, g in generation.items():
        ratio = f", {g['seconds'] / base['seconds']:.2f}× model.generate's time" if name != "model.generate" else ""
        print(f"generation {name:<15} {g['tokens_per_s']:8.0f} tokens/s ({g['seconds']:.3f} s, {g['tokens']} tokens)"
              + ratio)  # fmt: skip


if __name__ == "__main__":
    main()
