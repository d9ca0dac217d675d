"""Sample responses from a saved policy for a file of prompts (``instructrl generate``).

Reads ``{prompt, ...}`` records (the prompt format, e.g. ``data prepare`` output), writes one
``{prompt, response, stopped, n_tokens, sample, ...}`` record per sample to ``output`` (atomically), keeping
the input record's other fields. Greedy when ``temperature`` is 0, else pure sampling (top-k 0, top-p 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instructrl.config import require, require_non_negative, require_path_exists, require_positive
from instructrl.data.loading import load_prompts
from instructrl.eval.generate import generate_responses
from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
from instructrl.stages.common import log_data_source, set_threads
from instructrl.utils.device import DEVICE_HELP, resolve_device, valid_device_name
from instructrl.utils.guards import out_of_memory_advice
from instructrl.utils.io import atomic_write_jsonl


@dataclass
class Config:
    """Batched generation from a saved policy."""

    model: str = "runs/sandbox/sft"
    """Policy to sample from: a Hugging Face causal-LM directory with its tokenizer."""
    input: str = "prompts.jsonl"
    """JSONL of {prompt, ...} records."""
    output: str = "generations.jsonl"
    """Where the {prompt, response, stopped, n_tokens, sample} records go."""
    samples_per_prompt: int = 1
    """Responses drawn per prompt (with temperature > 0 they differ)."""
    max_new_tokens: int = 64
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    batch_size: int = 64
    """Prompts per generate() call."""
    skip_bad: bool = False
    """Skip (and count) malformed prompt records instead of stopping at the first one."""
    seed: int = 0
    """Sampling seed."""
    threads: int = 0
    """CPU threads for torch (0 = torch default)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""

    def validate(self) -> None:
        require_positive(self, "samples_per_prompt", "max_new_tokens", "batch_size")
        require_non_negative(self, "temperature", "threads")
        require_path_exists(self, "model", "input")
        require(valid_device_name(self.device), "device", f"must be {DEVICE_HELP}")


def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    log_data_source("generate", "prompts", cfg.input)
    records, stats = load_prompts(cfg.input, skip_bad=cfg.skip_bad)
    if stats.n_skipped:
        print(f"{cfg.input}: {stats.summary()}", flush=True)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer).to(resolve_device(cfg.device))
    prompts = [r.prompt for r in records for _ in range(cfg.samples_per_prompt)]
    with out_of_memory_advice("generation", "batch_size", "max_new_tokens"):
        generated = generate_responses(
            model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, seed=cfg.seed
        )
    rows = []
    for i, g in enumerate(generated):
        record = records[i // cfg.samples_per_prompt]
        extra = {"user_id": record.user_id} if record.user_id is not None else {}
        rows.append(
            {
                **record.meta,
                **extra,
                "prompt": record.prompt,
                "response": g.text,
                "stopped": g.stopped,
                "n_tokens": g.n_tokens,
                "sample": i % cfg.samples_per_prompt,
            }
        )
    n = atomic_write_jsonl(Path(cfg.output), rows)
    stopped = sum(r["stopped"] for r in rows) / max(1, n)
    print(f"generate: wrote {n} responses to {cfg.output} ({100 * stopped:.1f}% ended with EOS)", flush=True)
    return {"responses": n, "eos_rate": stopped, "skipped_prompts": stats.n_skipped}
