"""Pretrain a base causal LM (and its BPE tokenizer) on a text corpus: by default the sandbox's "web" corpus.

The result stands in for GPT-3 in the InstructGPT pipeline: capable but not aligned. The output folder is
a Hugging Face model directory (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(output_dir)``),
plus ``metrics.jsonl``, ``results.json`` (held-out perplexity) and the resolved config.

Documents are joined with EOS into one token stream and trained on random windows, so the model learns
that EOS ends a document. Interrupted runs resume from the newest checkpoint in ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from instructrl.config import (
    require,
    require_fraction,
    require_own_data,
    require_path_exists,
    require_positive,
)
from instructrl.data.loading import load_texts
from instructrl.errors import UserFacingError
from instructrl.models.causal_lm import ModelSpec, build_causal_lm, count_parameters, load_tokenizer
from instructrl.models.tokenizer import train_bpe_tokenizer
from instructrl.stages.common import PRECISIONS, log_data_source, mixed_precision
from instructrl.stages.training_run import TrainingRun, TrainingSettings, TrainingState
from instructrl.utils.guards import out_of_memory_advice, require_finite_weights
from instructrl.world import describe_world, load_world


@dataclass
class Config(TrainingSettings):
    """Pretraining of the base model."""

    output_dir: str = "runs/sandbox/base"
    """Where the model, tokenizer, metrics and checkpoints go (a Hugging Face model directory)."""
    corpus: str | None = None
    """JSONL of {text} records to train on; unset = the world's corpus (``run.world``, the built-in sandbox
    by default; then ``heldout`` must be unset too:
    a run never mixes the sandbox's data with yours)."""
    heldout: str | None = None
    """JSONL of {text} records for held-out perplexity; unset = the sandbox's held-out documents (only when
    ``corpus`` is unset too)."""
    sandbox_seed: int = 0
    """Seed of the world (``run.world``, default the sandbox) whose corpus is used when ``corpus`` is unset."""
    sandbox_docs: int = 30000
    """Number of sandbox corpus documents to generate when ``corpus`` is unset."""
    heldout_docs: int = 1000
    """Number of sandbox held-out documents when ``heldout`` is unset."""
    tokenizer: str | None = None
    """Existing tokenizer directory to reuse; unset = train a byte-level BPE tokenizer on the corpus."""
    vocab_size: int = 1024
    """Vocabulary size of the trained tokenizer."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Architecture of the base model."""
    seq_len: int = 128
    """Tokens per training window."""
    batch_size: int = 32
    """Windows per optimizer step."""
    max_steps: int = 900
    """Optimizer steps."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps before cosine decay."""
    weight_decay: float = 0.1  # (documented in TrainingSettings) pretraining decays its matrices
    eval_every: int = 250
    """Steps between held-out evaluations."""
    eval_windows: int = 64
    """Held-out windows per evaluation (0 = all)."""
    save_every: int = 500
    """Steps between resumable checkpoints."""

    def validate(self) -> None:
        require_positive(self, "vocab_size", "seq_len", "batch_size", "max_steps", "lr", "eval_every", "save_every")
        require_fraction(self, "min_lr_ratio")
        require_path_exists(self, "corpus", "heldout", "tokenizer")
        require_own_data(self, "heldout", ["corpus"])
        require_own_data(self, "corpus", ["heldout"])
        require(
            self.seq_len <= self.model.max_seq_len, "seq_len", f"must be <= model.max_seq_len={self.model.max_seq_len}"
        )
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")


def _corpus_texts(cfg: Config) -> tuple[list[str], list[str]]:
    """The training and held-out texts: each from its JSONL file, or else from the world's corpus (``run.world``)."""

    def texts(what: str, path: str | None, sandbox_docs: int, split: str) -> list[str]:
        if path is not None:
            log_data_source("pretrain", what, path)
            records, _ = load_texts(path)
            return [r.text for r in records]
        world = describe_world(cfg.run.world, cfg.sandbox_seed)
        log_data_source("pretrain", what, f"{world}, {sandbox_docs} {split} documents")
        return load_world(cfg.run.world, cfg.sandbox_seed).pretraining_corpus(sandbox_docs, split=split)

    train = texts("corpus", cfg.corpus, cfg.sandbox_docs, "train")
    return train, texts("held-out text", cfg.heldout, cfg.heldout_docs, "valid")


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined, each followed by EOS: shape (N,)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), 1024):
        for row in tokenizer(texts[start : start + 1024], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_perplexity(model, stream: torch.Tensor, seq_len: int, max_windows: int = 0, batch_size: int = 32) -> float:
    """Perplexity of ``model`` on consecutive non-overlapping windows of ``stream``."""
    model.eval()
    n_windows = (len(stream) - 1) // seq_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise UserFacingError(f"held-out text is shorter than one window of {seq_len} tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(n_windows, start + batch_size)) * seq_len
        x = torch.stack([stream[i : i + seq_len] for i in idx.tolist()])  # (b, seq_len)
        y = torch.stack([stream[i + 1 : i + 1 + seq_len] for i in idx.tolist()])
        logits = model(input_ids=x.to(model.device)).logits
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten().to(model.device), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += y.numel()
    return math.exp(total_nll / total_tokens)


def run(cfg: Config) -> dict:
    stage = TrainingRun.start(cfg, "pretrain", distributed=False)  # one process: no data parallelism here
    device = stage.runtime.device

    # ---- build: corpus, tokenizer, model, optimizer
    train_texts, held_texts = _corpus_texts(cfg)
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    train_stream = token_stream(train_texts, tokenizer)
    held_stream = token_stream(held_texts, tokenizer)
    if len(train_stream) <= cfg.seq_len + 1:
        raise UserFacingError(f"the corpus has {len(train_stream)} tokens, fewer than one window of {cfg.seq_len}")
    print(
        f"corpus: {len(train_texts)} docs, {len(train_stream):,} tokens; held-out {len(held_stream):,} tokens; "
        f"vocab {len(tokenizer)} (prepared in {stage.seconds():.1f}s)",
        flush=True,
    )
    model = build_causal_lm(cfg.model, tokenizer).to(device)
    print(f"model: {cfg.model.arch}, {count_parameters(model) / 1e6:.2f}M parameters", flush=True)
    state = TrainingState.adam_cosine(model, cfg, cfg.max_steps, cfg.warmup_steps, stage.runtime)
    data_gen = torch.Generator().manual_seed(cfg.run.seed)
    saved = stage.restore(state)
    if saved is not None:
        data_gen.set_state(saved["data_rng"])

    # ---- loop: random windows of the token stream; held-out perplexity every eval_every steps
    model.train()
    with stage.metrics_writer() as metrics, stage.progress(cfg.max_steps) as bar:
        for step in range(stage.start_step, cfg.max_steps):
            starts = torch.randint(0, len(train_stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=data_gen)
            window = torch.stack([train_stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
            record = train_step(cfg, state, window.to(device), step)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                record["heldout_ppl"] = stream_perplexity(model, held_stream, cfg.seq_len, cfg.eval_windows)
                model.train()
                bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['heldout_ppl']:.2f}")
            metrics.log(done, **record)
            bar.update(1)
            if stage.checkpoint_due(done, cfg.max_steps):
                stage.save_checkpoint(done, state, data_rng=data_gen.get_state())

    # ---- save: a Hugging Face model directory with its tokenizer
    model.eval()
    heldout_ppl = stream_perplexity(model, held_stream, cfg.seq_len)
    require_finite_weights(model, "the pretrained model")
    model.cpu().save_pretrained(stage.out)
    tokenizer.save_pretrained(stage.out)
    results = {
        "heldout_perplexity": heldout_ppl,
        "parameters": count_parameters(model),
        "train_tokens": len(train_stream),
        "steps": cfg.max_steps,
        "seconds": stage.seconds(),
        "model": dataclasses.asdict(cfg.model),
    }
    return stage.finish(results, f"pretrain: held-out perplexity {heldout_ppl:.3f}; model saved to {stage.out}")


def train_step(cfg: Config, state: TrainingState, window: torch.Tensor, step: int) -> dict:
    """Optimizer step ``step + 1`` on ``window`` (B, T+1): next-token loss on every position; returns its metrics."""
    model, device = state.model, window.device
    state.optimizer.zero_grad(set_to_none=True)
    with out_of_memory_advice("training", "batch_size", "seq_len"):
        with mixed_precision(device, PRECISIONS[cfg.run.precision]):
            logits = model(input_ids=window[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if state.guard.step_is_finite(step + 1, loss=loss, grad_norm=grad_norm):
        state.optimizer.step()
    state.scheduler.step()
    record = {"loss": loss.item(), "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item()}
    record.update(state.guard.metrics())
    return record
