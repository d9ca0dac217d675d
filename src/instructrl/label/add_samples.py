"""``instructrl label add-samples``: sample K responses per comparison prompt from a saved policy.

For every prompt loaded with ``task=comparison`` that has no comparison item yet (all of them with
``resample``), K responses are sampled from the causal LM in ``model`` (any saved policy: SFT, PPO, a
pretrained base) and stored as one comparison item for labelers to rank. InstructGPT showed labelers
K = 4 to 9 responses per prompt (§3.5); with ``k_max`` > ``k`` each prompt's K is drawn uniformly from
``k..k_max`` (``Random(f"{seed}:k:{prompt_id}")``).

Responses are sampled exactly like the reward-model stage's own samples: pure sampling at ``temperature``
(top-k 0, top-p 1), cut at the first EOS (:func:`instructrl.eval.generate.generate_responses`). Prompts are
processed in chunks of ``chunk_prompts``, each committed on its own, so an interrupted run keeps the finished
chunks and the same command continues with the rest. Prompts too long for the model's context with
``max_new_tokens`` added are skipped and counted. An empty response is re-sampled (``empty_retries``
times at most) because the data loaders refuse empty responses. Responses are held to the web form's rules
for labelers' text (:func:`instructrl.label.forms.clean_generated_text`): control characters and U+FFFD
(undecodable bytes, e.g. a token that ends inside a character) are replaced by visible marks, and how many
were replaced is reported.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from instructrl.config import require, require_non_negative, require_path_exists, require_positive
from instructrl.label.db import open_database
from instructrl.label.forms import MAX_K, UNKNOWN_MARK, clean_generated_text
from instructrl.label.tasks import add_comparison_item, prompts_needing_samples


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label add-samples``."""

    db: str
    """Labeling database file (SQLite)."""
    model: str
    """Saved policy to sample from: a Hugging Face causal-LM directory with its tokenizer."""
    k: int = 4
    """Responses per prompt (InstructGPT: 4 to 9)."""
    k_max: int = 0
    """When > k, each prompt's K is drawn uniformly from k..k_max; 0 = always k."""
    limit: int = 0
    """Sample for at most this many prompts (oldest first); 0 = all that need samples."""
    resample: bool = False
    """Also sample for prompts that already have a comparison item (adds another item for each)."""
    temperature: float = 1.0
    """Sampling temperature (> 0; 1 samples from the policy itself)."""
    max_new_tokens: int = 64
    """Longest response in tokens."""
    batch_size: int = 64
    """Sequences per generate() call."""
    chunk_prompts: int = 32
    """Prompts sampled and committed together."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."""
    seed: int = 0
    """Seed of the sampling and of the per-prompt K."""
    empty_retries: int = 3
    """Re-sample an empty (or whitespace-only) response up to this many times; responses still empty are
    dropped, and a prompt left with fewer than 2 responses is skipped (counted)."""

    def validate(self) -> None:
        require_path_exists(self, "model")
        require(2 <= self.k <= MAX_K, "k", f"must lie in [2, {MAX_K}] (InstructGPT used 4 to 9), got {self.k}")
        require(
            self.k_max == 0 or self.k <= self.k_max <= MAX_K,
            "k_max",
            f"must be 0 or lie in [k, {MAX_K}], got {self.k_max}",
        )
        require(self.temperature > 0, "temperature", "must be > 0 (greedy decoding would give K identical responses)")
        require_positive(self, "max_new_tokens", "batch_size", "chunk_prompts")
        require_non_negative(self, "limit", "empty_retries")


def choose_k(cfg: Config, prompt_id: int) -> int:
    """K for one prompt: ``k``, or uniform on ``k..k_max`` seeded by the prompt id (stable across runs)."""
    if cfg.k_max <= cfg.k:
        return cfg.k
    return random.Random(f"{cfg.seed}:k:{prompt_id}").randint(cfg.k, cfg.k_max)


def sample_non_empty(
    sample: Callable[[list[str], int], list[str]], prompts: list[str], ks: list[int], retries: int
) -> list[list[str]]:
    """``ks[i]`` responses per prompt from ``sample(prompts, attempt)``, without empty ones.

    Attempt 0 samples every response; each later attempt (up to ``retries``) re-samples only the responses
    still empty. Responses empty after the last attempt are dropped, so a prompt may get fewer than K.
    The data loaders refuse empty responses, and an empty output carries nothing to compare.
    """
    texts = [[""] * k for k in ks]
    todo = [(i, j) for i, k in enumerate(ks) for j in range(k)]
    for attempt in range(retries + 1):
        if not todo:
            break
        for (i, j), text in zip(todo, sample([prompts[i] for i, _ in todo], attempt)):
            texts[i][j] = text
        todo = [(i, j) for i, j in todo if not texts[i][j].strip()]
    return [[t for t in row if t.strip()] for row in texts]


def run(cfg: Config) -> dict[str, Any]:
    from instructrl.eval.generate import generate_responses
    from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
    from instructrl.models.scoring import max_positions, resolve_device

    with open_database(cfg.db, must_exist=True) as db:
        with db.read() as session:
            todo = prompts_needing_samples(session, cfg.limit, cfg.resample)
        if not todo:
            print("label add-samples: no comparison prompts need samples (load some with task=comparison)")
            return {"items": 0, "responses": 0, "too_long": 0, "too_empty": 0, "replaced": {}}
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model, tokenizer).to(resolve_device(cfg.device))
        context = max_positions(model)
        n_items = n_responses = too_long = too_empty = 0
        # unprintable characters replaced, by kind, and in how many sampled responses (re-sampled ones too)
        replaced: Counter[str] = Counter()
        for start in range(0, len(todo), cfg.chunk_prompts):
            chunk = todo[start : start + cfg.chunk_prompts]
            if context is not None:
                lengths = [len(ids) for ids in tokenizer([t for _, t in chunk], add_special_tokens=False)["input_ids"]]
                fits = [(pid, text) for (pid, text), n in zip(chunk, lengths) if n + cfg.max_new_tokens <= context]
                too_long += len(chunk) - len(fits)
                chunk = fits
            if not chunk:
                continue
            ks = [choose_k(cfg, pid) for pid, _ in chunk]

            def sample(prompts: list[str], attempt: int, first_prompt_id: int = chunk[0][0]) -> list[str]:
                generated = generate_responses(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    batch_size=cfg.batch_size,
                    seed=(cfg.seed * 1_000_003 + first_prompt_id) * 31 + attempt,
                )
                cleaned = [clean_generated_text(g.text) for g in generated]
                for _, counts in cleaned:
                    replaced.update(counts, responses=bool(counts))
                return [text for text, _ in cleaned]

            samples = sample_non_empty(sample, [text for _, text in chunk], ks, cfg.empty_retries)
            with db.write() as session:
                for (prompt_id, _), texts in zip(chunk, samples):
                    if len(texts) < 2:
                        too_empty += 1
                        continue
                    add_comparison_item(session, prompt_id, texts, [cfg.model] * len(texts))
                    n_items += 1
                    n_responses += len(texts)
            done = min(start + cfg.chunk_prompts, len(todo))
            print(f"label add-samples: {done}/{len(todo)} prompts sampled", flush=True)
    print(
        f"label add-samples: added {n_items} comparison items with {n_responses} responses from {cfg.model}"
        + (f"; {too_long} prompts too long for the model's context skipped" if too_long else "")
        + (f"; {too_empty} prompts skipped for lack of 2 non-empty responses" if too_empty else ""),
        flush=True,
    )
    if replaced:
        print(
            f"label add-samples: {replaced['responses']} sampled responses held characters labelers may not type, "
            f"shown as marks: {replaced['control']} control characters (as control pictures such as \u2400), "
            f"{replaced['U+FFFD']} U+FFFD (undecodable bytes, as {UNKNOWN_MARK})",
            flush=True,
        )
    return {
        "items": n_items,
        "responses": n_responses,
        "too_long": too_long,
        "too_empty": too_empty,
        "replaced": dict(replaced),
    }
