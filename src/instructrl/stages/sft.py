"""Stage 1 — supervised fine-tuning (SFT) of a causal LM on demonstrations (InstructGPT §3.5, App. C.1).

Loss: next-token cross-entropy on **response tokens only** (prompt tokens masked), with EOS appended to
every response and PAD distinct from EOS, so the model learns where to stop. Token-mean over the whole
optimizer batch, so gradient accumulation over micro-batches gives exactly the same update.

Paper defaults, each configurable: Adam β = (0.9, 0.95); cosine decay to 10% of the peak LR with no
warmup; residual dropout; a number of epochs. The PPO initialization in the paper is a 2-epoch SFT with
10% pretraining data mixed in (``ptx_fraction``). Model selection like the paper: with a reward model the
epoch whose greedy responses on validation prompts score best is kept; otherwise the lowest validation loss.

Departures: ``packing`` concatenates several short examples into one row with attention crossing example
boundaries inside a row (cheap; the loss mask still covers only response tokens). LoRA through peft is
merged into the base weights on save so the output is a plain Hugging Face model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from instructrl.config import (
    require,
    require_fraction,
    require_non_negative,
    require_own_data,
    require_path_exists,
    require_positive,
)
from instructrl.data.loading import encode_prompts, load_demonstrations, load_texts
from instructrl.data.records import Demonstration
from instructrl.errors import UserFacingError
from instructrl.models.causal_lm import count_parameters, load_causal_lm, load_tokenizer
from instructrl.models.dropout import add_residual_dropout
from instructrl.stages.common import PRECISIONS, log_data_source, mixed_precision
from instructrl.stages.training_run import TrainingRun, TrainingSettings, TrainingState
from instructrl.utils.guards import out_of_memory_advice
from instructrl.world import describe_world, load_world, world_demonstrations

IGNORE = -100
"""Label value cross-entropy ignores (prompt and padding positions)."""


@dataclass
class LoraSettings:
    """Optional LoRA adapters (peft); merged into the weights when the model is saved."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (GPT-2 models use 'c_attn', 'c_proj')."""

    def validate(self) -> None:
        require_positive(self, "r", "alpha")
        require_fraction(self, "dropout")


@dataclass
class Config(TrainingSettings):
    """Supervised fine-tuning on demonstrations."""

    model: str = "runs/sandbox/base"
    """Causal LM to fine-tune: a local Hugging Face directory (or a hub name where the network allows)."""
    output_dir: str = "runs/sandbox/sft"
    """Where the fine-tuned model (HF format), metrics, checkpoints and results go."""
    data: str | None = None
    """Demonstrations JSONL ({prompt, response} or {messages}); unset = the world's labelers' demonstrations
    (``run.world``, the sandbox by default; then
    ``pretrain_data`` must be unset too: a run never mixes the sandbox's data with yours)."""
    valid_data: str | None = None
    """Validation demonstrations; unset = hold out ``valid_fraction`` of ``data``."""
    valid_fraction: float = 0.05
    """Fraction of demonstrations held out for validation when ``valid_data`` is unset."""
    skip_bad: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""
    sandbox_seed: int = 0
    """Seed of the world (``run.world``, default the sandbox) used when ``data`` is unset."""
    sandbox_demos: int = 3000
    """Number of sandbox demonstrations when ``data`` is unset."""
    epochs: int = 2
    """Passes over the demonstrations (paper: 16 for the released SFT model, 2 for the PPO initialization)."""
    lr: float = 1e-3
    """Peak learning rate (paper 9.65e-6 at 1.3B; tiny sandbox models need far larger)."""
    warmup_steps: int = 0
    """Linear warmup steps (paper: none)."""
    batch_size: int = 32
    """Sequences per optimizer step (paper: 32)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation); 0 = batch_size."""
    residual_dropout: float = 0.1
    """Dropout on each attention / MLP output before the residual add (paper: 0.2)."""
    ptx_fraction: float = 0.1
    """Fraction of training sequences drawn from pretraining text (paper's PPO init: 10%); 0 disables."""
    pretrain_data: str | None = None
    """JSONL of {text} for ``ptx_fraction``; unset = the world's corpus, which a run on your own ``data`` refuses
    (set this, or ptx_fraction=0)."""
    max_prompt_tokens: int = 192
    """Longer prompts are dropped (and counted), as the paper dropped prompts over 1k tokens."""
    max_response_tokens: int = 64
    """Longer responses are dropped (and counted): a truncated target would teach stopping mid-answer."""
    select_by: str = "auto"
    """Checkpoint selection across epochs: 'loss', 'reward' (needs reward_model) or 'auto' (reward if given)."""
    reward_model: str | None = None
    """Reward model directory used for selection by reward."""
    select_prompts: int = 128
    """Validation prompts scored for selection by reward."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA options."""
    packing: bool = False
    """Concatenate short examples into rows of up to max_prompt_tokens + max_response_tokens tokens."""
    save_every: int = 200
    """Optimizer steps between resumable checkpoints."""

    def validate(self) -> None:
        require_positive(self, "epochs", "lr", "batch_size", "max_prompt_tokens", "max_response_tokens", "save_every")
        require_non_negative(self, "micro_batch_size", "warmup_steps", "grad_clip", "weight_decay")
        require_fraction(self, "min_lr_ratio", "residual_dropout")
        require_fraction(self, "ptx_fraction", inclusive_high=False)
        require_fraction(self, "valid_fraction", inclusive_high=False)
        require_path_exists(self, "data", "valid_data", "pretrain_data", "reward_model")
        require(self.select_by in ("auto", "loss", "reward"), "select_by", "must be 'auto', 'loss' or 'reward'")
        require(
            self.select_by != "reward" or self.reward_model is not None,
            "select_by",
            "'reward' needs reward_model to be set",
        )
        mb = self.micro_batch_size or self.batch_size
        require(self.batch_size % mb == 0, "micro_batch_size", f"must divide batch_size={self.batch_size}")
        require(self.data is not None or self.valid_data is None, "valid_data", "needs data to be set too")
        require_own_data(self, "data", ["pretrain_data"])
        if self.ptx_fraction > 0:
            require_own_data(self, "pretrain_data", ["data"], off="ptx_fraction=0")
        require(
            not (self.lora.enabled and self.run.sharding == "fsdp"),
            "lora.enabled",
            "LoRA trains a small fraction of the weights: run it with run.sharding=none",
        )


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence: ``labels`` hold IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def encode_demonstration(demo: Demonstration, tokenizer, max_prompt: int, max_response: int) -> Example | None:
    """prompt ⊕ response ⊕ EOS with loss on the response and EOS only; None when over a length limit."""
    (prompt_ids,) = encode_prompts(tokenizer, [demo.prompt], [demo.prompt_messages])
    response_ids = tokenizer(demo.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) > max_prompt or len(response_ids) > max_response:
        return None
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)


def encode_pretraining(texts: list[str], tokenizer, n: int, length: int, rng: random.Random) -> list[Example]:
    """``n`` windows of pretraining text (loss on every token), each document followed by EOS."""
    stream: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(row + [tokenizer.eos_token_id])
    if len(stream) <= length:
        raise UserFacingError(f"pretraining text has {len(stream)} tokens, fewer than one window of {length}")
    out = []
    for _ in range(n):
        s = rng.randrange(0, len(stream) - length)
        window = stream[s : s + length]
        out.append(Example(window, list(window)))
    return out


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy first-fit packing of examples (in order) into rows of at most ``max_len`` tokens."""
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_len:
            rows.append(Example(ids, labels))
            ids, labels = [], []
        ids = ids + ex.input_ids
        labels = labels + ex.labels
    if ids:
        rows.append(Example(ids, labels))
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; returns input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_nll_sum(
    model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over labelled positions, and how many there were (forward autocast to
    ``autocast_dtype`` when set; the NLL itself is computed in float32)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with mixed_precision(device, autocast_dtype):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return nll, int((targets != IGNORE).sum())


@torch.no_grad()
def mean_nll(model, examples: list[Example], pad_id: int, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, n = response_nll_sum(model, collate(examples[start : start + batch_size], pad_id))
        total += nll.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _load_demos(cfg: Config) -> tuple[list[Demonstration], list[Demonstration]]:
    if cfg.data is None:
        world = describe_world(cfg.run.world, cfg.sandbox_seed)
        log_data_source("sft", "demonstrations", f"{world}, {cfg.sandbox_demos} labelers' demonstrations")
        demos = world_demonstrations(load_world(cfg.run.world, cfg.sandbox_seed), cfg.sandbox_demos, cfg.sandbox_seed)
    else:
        log_data_source("sft", "demonstrations", cfg.data)
        demos, stats = load_demonstrations(cfg.data, skip_bad=cfg.skip_bad)
        if stats.n_skipped:
            print(f"skipped {stats.summary()}", flush=True)
    if cfg.valid_data is not None:
        log_data_source("sft", "validation demonstrations", cfg.valid_data)
        valid, _ = load_demonstrations(cfg.valid_data, skip_bad=cfg.skip_bad)
        return demos, valid
    log_data_source("sft", "validation demonstrations", f"{cfg.valid_fraction:g} of the demonstrations, held out")
    shuffled = list(demos)
    random.Random(cfg.run.seed).shuffle(shuffled)
    n_valid = max(1, int(len(shuffled) * cfg.valid_fraction))
    return shuffled[n_valid:], shuffled[:n_valid]


def _pretraining_texts(cfg: Config) -> list[str]:
    if cfg.pretrain_data is not None:
        log_data_source("sft", "pretraining text (ptx_fraction)", cfg.pretrain_data)
        return [r.text for r in load_texts(cfg.pretrain_data)[0]]
    world = describe_world(cfg.run.world, cfg.sandbox_seed)
    log_data_source("sft", "pretraining text (ptx_fraction)", f"{world}, 4000 documents")
    return load_world(cfg.run.world, cfg.sandbox_seed).pretraining_corpus(4000, split="train")


# --------------------------------------------------------------------------- model selection


def _select_score(cfg: Config, model, tokenizer, valid_examples, valid_demos, pad_id, scorer) -> dict[str, float]:
    """Validation loss, and (with a reward model) the mean RM score of greedy responses."""
    out = {"valid_loss": mean_nll(model, valid_examples, pad_id)}
    if scorer is not None:
        from instructrl.eval.generate import generate_responses

        prompts = [d.prompt for d in valid_demos[: cfg.select_prompts]]
        with out_of_memory_advice("generation for selection by reward", "select_prompts", "max_response_tokens"):
            responses = generate_responses(model, tokenizer, prompts, max_new_tokens=cfg.max_response_tokens)
        out["valid_rm_score"] = float(scorer.score(prompts, [r.text for r in responses]).mean())
    return out


def _make_scorer(cfg: Config, tokenizer):
    use_reward = cfg.select_by == "reward" or (cfg.select_by == "auto" and cfg.reward_model is not None)
    if not use_reward:
        return None
    from instructrl.models.scoring import RewardScorer

    return RewardScorer(cfg.reward_model, tokenizer)


# --------------------------------------------------------------------------- build


@dataclass
class TrainingData:
    """Tokenized training and validation sequences."""

    train: list[Example]
    """Demonstrations, pretraining windows (``ptx_fraction``) and, with ``packing``, rows of several of them."""
    valid: list[Example]
    """Validation demonstrations that fit the length limits."""
    valid_demos: list[Demonstration]
    """Validation demonstrations (their prompts are answered for selection by reward)."""
    dropped: int
    """Training demonstrations over the length limits."""


def build_data(cfg: Config, tokenizer) -> TrainingData:
    train_demos, valid_demos = _load_demos(cfg)
    encode = lambda d: encode_demonstration(d, tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens)  # noqa: E731
    train_examples = [e for e in map(encode, train_demos) if e is not None]
    valid_examples = [e for e in map(encode, valid_demos) if e is not None]
    dropped = len(train_demos) - len(train_examples)
    if not train_examples:
        raise UserFacingError("no demonstration fits max_prompt_tokens / max_response_tokens")
    if cfg.ptx_fraction > 0:
        n_ptx = round(len(train_examples) * cfg.ptx_fraction / (1 - cfg.ptx_fraction))
        window = max(len(e.input_ids) for e in train_examples)
        train_examples += encode_pretraining(
            _pretraining_texts(cfg), tokenizer, n_ptx, window, random.Random(cfg.run.seed)
        )
    else:
        log_data_source("sft", "pretraining text (ptx_fraction)", "none (ptx_fraction=0)")
    if cfg.packing:
        random.Random(cfg.run.seed).shuffle(train_examples)
        train_examples = pack_examples(train_examples, cfg.max_prompt_tokens + cfg.max_response_tokens)
    print(
        f"sft: {len(train_examples)} training sequences ({dropped} demonstrations over the length limits dropped), "
        f"{len(valid_examples)} validation",
        flush=True,
    )
    return TrainingData(train_examples, valid_examples, valid_demos, dropped)


def build_model(cfg: Config, tokenizer, device: torch.device):
    """The causal LM on ``device``, with LoRA adapters when enabled, and residual dropout."""
    model = load_causal_lm(cfg.model, tokenizer).to(device)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    add_residual_dropout(model, cfg.residual_dropout)
    print(
        f"model: {count_parameters(model, trainable_only=True) / 1e6:.2f}M trainable of "
        f"{count_parameters(model) / 1e6:.2f}M parameters",
        flush=True,
    )
    return model


# --------------------------------------------------------------------------- the loop


def train_step(cfg: Config, state: TrainingState, training_model, data: TrainingData, step: int, pad_id: int) -> dict:
    """Optimizer step ``step + 1`` on this rank's share of global batch ``step``; returns its metrics.

    The batch is slice ``step mod steps_per_epoch`` of epoch ``step // steps_per_epoch``'s order, which depends only
    on (seed, epoch), so a resumed run finds its data position from the step alone.
    """
    runtime = state.runtime
    micro = cfg.micro_batch_size or cfg.batch_size
    epoch, index_in_epoch = divmod(step, steps_per_epoch(cfg, data))
    order = list(range(len(data.train)))
    random.Random(cfg.run.seed * 1000 + epoch).shuffle(order)  # data order depends only on (seed, epoch)
    batch_ids = order[index_in_epoch * cfg.batch_size : (index_in_epoch + 1) * cfg.batch_size]
    local_ids = runtime.shard(batch_ids)  # this rank's contiguous share of the global batch
    micro_batches = [
        collate([data.train[i] for i in local_ids[s : s + micro]], pad_id) for s in range(0, len(local_ids), micro)
    ]
    local_tokens = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
    n_tokens = runtime.gradient_normalizer(local_tokens)  # global token count / processes
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    with out_of_memory_advice("training", "micro_batch_size", "max_prompt_tokens", "max_response_tokens"):
        for index, mb in enumerate(micro_batches):
            with runtime.no_sync([training_model] if index < len(micro_batches) - 1 else []):
                nll, _ = response_nll_sum(training_model, mb, PRECISIONS[cfg.run.precision])
                runtime.backward(nll / n_tokens)  # token mean over the whole global batch, whatever the split
            loss_sum += nll.item()
    loss_sum = runtime.sum(loss_sum) / runtime.world_size  # so that loss_sum / n_tokens is the global mean
    grad_norm = runtime.clip_grad_norm_(state.model, cfg.grad_clip or float("inf"))
    if state.guard.step_is_finite(step + 1, loss=loss_sum, grad_norm=grad_norm):  # same verdict on every rank
        state.optimizer.step()
    state.scheduler.step()
    record = {"loss": loss_sum / n_tokens, "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item()}
    record["tokens"] = round(n_tokens * runtime.world_size)  # response tokens of the global batch
    record.update(state.guard.metrics())
    return record


def steps_per_epoch(cfg: Config, data: TrainingData) -> int:
    return max(1, len(data.train) // cfg.batch_size)


def keep_if_best(best: dict | None, value: float, epoch: int, model) -> dict | None:
    """``best`` (the selected epoch: its score ``value`` and weights), replaced when ``value`` is higher."""
    if best is None or value > best["value"]:
        from torch.distributed.tensor import DTensor

        # on the CPU; a shard (run.sharding=fsdp) stays on its device, where its process group is
        copy = lambda v: v.detach().clone() if isinstance(v, DTensor) else v.detach().to("cpu", copy=True)  # noqa: E731
        return {"value": value, "epoch": epoch, "state": {k: copy(v) for k, v in model.state_dict().items()}}
    return best


def run(cfg: Config) -> dict:
    stage = TrainingRun.start(cfg, "sft")
    runtime = stage.runtime

    # ---- build: data, model, optimizer
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    data = build_data(cfg, tokenizer)
    model = build_model(cfg, tokenizer, runtime.device)
    runtime.require_divisible(cfg.batch_size, "batch_size")
    per_epoch = steps_per_epoch(cfg, data)
    total_steps = per_epoch * cfg.epochs
    state = TrainingState.adam_cosine(model, cfg, total_steps, cfg.warmup_steps, runtime)
    scorer = _make_scorer(cfg, tokenizer)
    saved = stage.restore(state, best=lambda: keep_if_best(None, 0.0, 0, model))  # the saved selection's layout
    best, history = (saved["best"], saved["history"]) if saved is not None else (None, [])

    # ---- loop: one optimizer step per global batch; at each epoch's end, evaluate for model selection
    training_model = state.prepare()
    model.train()
    with stage.metrics_writer() as metrics, stage.progress(total_steps) as bar:
        for step in range(stage.start_step, total_steps):
            record = train_step(cfg, state, training_model, data, step, pad_id)
            done = step + 1
            if done % per_epoch == 0:
                epoch = done // per_epoch
                scores = _select_score(cfg, model, tokenizer, data.valid, data.valid_demos, pad_id, scorer)
                record.update(scores, epoch=epoch)
                history.append({"epoch": epoch, **scores})
                value = scores["valid_rm_score"] if scorer is not None else -scores["valid_loss"]
                best = keep_if_best(best, value, epoch, model)
                bar.set_postfix(valid_loss=f"{scores['valid_loss']:.3f}")
            metrics.log(done, **record)
            bar.update(1)
            if stage.checkpoint_due(done, total_steps):
                stage.save_checkpoint(done, state, best=best, history=history)

    # ---- save: the selected epoch's weights (LoRA merged) as a Hugging Face model
    if best is not None:
        model.load_state_dict(best["state"])
    model.eval()
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    runtime.save_pretrained(model, tokenizer, stage.out, "the fine-tuned model")
    results = {
        "selected_epoch": best["epoch"] if best else cfg.epochs,
        "selected_by": "reward" if scorer is not None else "loss",
        "history": history,
        "valid_loss": mean_nll(model, data.valid, pad_id) if data.valid else None,
        "train_sequences": len(data.train),
        "dropped_over_length": data.dropped,
        "steps": total_steps,
        "seconds": stage.seconds(),
    }
    return stage.finish(
        results, f"sft: selected epoch {results['selected_epoch']} by {results['selected_by']}; saved to {stage.out}"
    )
