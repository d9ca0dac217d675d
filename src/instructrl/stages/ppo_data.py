"""PPO's data: the prompts it rolls out (cycled, reshuffled every pass) and, for PPO-ptx, pretraining windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from instructrl.data.loading import encode_prompts, load_prompts, load_texts
from instructrl.errors import UserFacingError
from instructrl.stages.common import log_data_source
from instructrl.world import DEFAULT_WORLD, describe_world, load_world, stage_tasks


@dataclass
class PromptData:
    """The prompts of a PPO run, tokenized, and the order they are drawn in."""

    texts: list[str]
    ids: list[list[int]]
    """Token ids of each prompt (no special tokens, as SFT encoded them)."""
    order: PromptSampler

    def next_batch(self, n: int) -> list[int]:
        """Indices of the next ``n`` prompts."""
        return self.order.next(n)


def load_prompt_data(
    path: str | None, tokenizer, max_prompt_tokens: int, seed: int, skip_bad: bool = False, sandbox_seed: int = 0,
    world: str = DEFAULT_WORLD,
) -> PromptData:  # fmt: skip
    """Prompts from a JSONL file of {prompt} records (or the PPO pool of ``world`` built with ``sandbox_seed`` when
    ``path`` is None), without
    the empty ones and those over ``max_prompt_tokens`` (counted and reported)."""
    if path is not None:
        texts = [r.prompt for r in _load_file("prompts", path, load_prompts, skip_bad)]
    else:
        # the PPO pool: train-split prompts that neither the SFT nor the RM data used (InstructGPT Table 6)
        log_data_source("ppo", "prompts", f"{describe_world(world, sandbox_seed)}, its PPO prompt pool")
        texts = [t.prompt for t in stage_tasks(load_world(world, sandbox_seed), "ppo")]
    encoded = encode_prompts(tokenizer, texts)
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= max_prompt_tokens]
    dropped = len(texts) - len(keep)
    if dropped:
        print(f"dropped {dropped} prompts that are empty or over {max_prompt_tokens} tokens", flush=True)
    if not keep:
        raise UserFacingError("no usable prompts: all are empty or longer than generation.max_prompt_tokens")
    return PromptData([texts[i] for i in keep], [encoded[i] for i in keep], PromptSampler(len(keep), seed=seed))


def load_pretraining_windows(
    path: str | None, tokenizer, seq_len: int, seed: int, skip_bad: bool = False, sandbox_seed: int = 0,
    sandbox_docs: int = 5000, world: str = DEFAULT_WORLD,
) -> WindowSampler:  # fmt: skip
    """Random windows of the pretraining texts (a JSONL file of {text} records, or the corpus of ``world`` when
    ``path`` is None) joined by EOS, as in pretraining."""
    from instructrl.stages.pretrain import token_stream

    if path is not None:
        texts = [r.text for r in _load_file("pretraining text (ptx)", path, load_texts, skip_bad)]
    else:
        source = f"{describe_world(world, sandbox_seed)}, {sandbox_docs} documents"
        log_data_source("ppo", "pretraining text (ptx)", source)
        texts = load_world(world, sandbox_seed).pretraining_corpus(sandbox_docs, split="train")
    stream = token_stream(texts, tokenizer)
    if len(stream) <= seq_len:
        raise UserFacingError(f"pretraining text has {len(stream)} tokens, fewer than one window of {seq_len}")
    return WindowSampler(stream, seq_len, seed=seed)


def _load_file(source: str, path: str, load, skip_bad: bool) -> list:
    """The records of the user's file ``path`` for data source ``source``, logged with what loading kept."""
    log_data_source("ppo", source, path)
    records, stats = load(path, skip_bad=skip_bad)
    print(f"{source} {path}: {stats.summary()}", flush=True)
    return records


class PromptSampler:
    """Cycles through ``n`` prompts in a random order, reshuffling after each pass [ppo-details: cycle-prompts]."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0
        self.passes = 0

    def next(self, k: int) -> list[int]:
        """The next ``k`` prompt indices; a batch may straddle two passes."""
        out: list[int] = []
        while len(out) < k:
            if self.position == self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
                self.position = 0
                self.passes += 1
            take = min(k - len(out), self.n - self.position)
            out.extend(self.order[self.position : self.position + take].tolist())
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["order"]) != self.n:
            raise ValueError(f"checkpoint was made with {len(state['order'])} prompts, this run has {self.n}")
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])
        self.passes = int(state["passes"])


class WindowSampler:
    """Random fixed-length windows of a token stream (documents joined by EOS): the ptx batches."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int):
        if len(stream) <= seq_len:
            raise ValueError(f"the pretraining stream has {len(stream)} tokens, fewer than one window of {seq_len}")
        self.stream = stream
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        """(n, seq_len) windows starting at uniform random offsets."""
        starts = torch.randint(0, len(self.stream) - self.seq_len + 1, (n,), generator=self.generator)
        return torch.stack([self.stream[s : s + self.seq_len] for s in starts.tolist()])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
