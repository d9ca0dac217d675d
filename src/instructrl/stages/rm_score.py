"""Score a file of (prompt, response) records with a reward model: ``instructrl rm score``.

Input: JSONL of ``{"prompt", "response"}`` (or chat ``{"messages": [...]}``) records, any extra fields kept.
Output: the same records, each with a ``score`` field r_θ(x, y) — normalized by default, so labeler
demonstrations average 0 — written atomically (a reader never sees a half-written file).

    instructrl rm score --set model=runs/sandbox/rm --set input=pairs.jsonl --set output=scored.jsonl
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from instructrl.config import require, require_path_exists, require_positive
from instructrl.data.loading import load_demonstrations
from instructrl.data.records import Demonstration
from instructrl.models.scoring import RewardScorer
from instructrl.utils.io import atomic_write_jsonl


@dataclass
class Config:
    """Scoring of (prompt, response) records with a saved reward model."""

    model: str = "runs/sandbox/rm"
    """Reward-model directory saved by ``instructrl rm``."""
    input: str = ""
    """JSONL of {prompt, response} or {messages} records to score."""
    output: str = ""
    """Where to write the records with a ``score`` field added."""
    normalized: bool = True
    """Add the stored bias (demonstrations score mean 0); false = the raw head output."""
    batch_size: int = 32
    """Completions per forward pass."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."""
    skip_bad: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""

    def validate(self) -> None:
        require(bool(self.input), "input", "set the JSONL file to score (--set input=FILE.jsonl)")
        require(bool(self.output), "output", "set where to write the scores (--set output=OUT.jsonl)")
        require(Path(self.output).resolve() != Path(self.input).resolve(), "output", "must differ from input")
        require_positive(self, "batch_size")
        require_path_exists(self, "model", "input")


def scored_record(record: Demonstration, score: float) -> dict:
    """The input record as it was read (chat records keep their messages), with ``score`` added."""
    if record.prompt_messages is not None:
        messages = [*record.prompt_messages, {"role": "assistant", "content": record.response}]
        return {"messages": messages, **record.meta, "score": score}
    return {"prompt": record.prompt, "response": record.response, **record.meta, "score": score}


def run(cfg: Config) -> dict:
    t0 = time.time()
    records, stats = load_demonstrations(cfg.input, skip_bad=cfg.skip_bad)
    if stats.n_skipped:
        print(f"rm score: {stats.summary()}", flush=True)
    scorer = RewardScorer(cfg.model, batch_size=cfg.batch_size, device=cfg.device)
    prompts, turns = [r.prompt for r in records], [r.prompt_messages for r in records]
    scores = scorer.score(prompts, [r.response for r in records], cfg.normalized, turns)
    atomic_write_jsonl(cfg.output, (scored_record(r, s) for r, s in zip(records, scores.tolist())))
    result = {
        "records": len(records),
        "skipped": stats.n_skipped,
        "mean": scores.mean().item() if len(records) else None,
        "std": scores.std().item() if len(records) > 1 else None,
        "output": cfg.output,
        "seconds": time.time() - t0,
    }
    mean_text = f"{result['mean']:+.4f}" if result["mean"] is not None else "n/a"
    print(f"rm score: {len(records)} records scored (mean {mean_text}) -> {cfg.output}", flush=True)
    return result
