"""Batched reward-model scoring: r_θ(x, y) for many (prompt, response) pairs at once.

A completion is encoded exactly as ``instructrl rm`` trains on it and as ``sft`` encodes demonstrations:

    prompt tokens ⊕ response tokens ⊕ EOS,   right-padded with PAD,

each part tokenized on its own without special tokens, and the reward is read at the EOS, the last real
token, and only there: scores at other positions are meaningless [ppo-details: reward-at-eos].

:class:`RewardScorer` is the one-call API other stages use (SFT model selection, PPO rewards, evaluation)::

    scorer = RewardScorer("runs/sandbox/rm")
    scores = scorer.score(prompts, responses)    # (N,) float32, normalized: demonstrations score mean 0

For speed, completions are sorted by length before batching (less padding per batch) and the scores are
put back in the caller's order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instructrl.data.loading import encode_prompts
from instructrl.errors import UserFacingError
from instructrl.models.reward import last_token_scores, load_reward_model
from instructrl.utils.device import resolve_device
from instructrl.utils.distributed import call_on


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings allow (None when the config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched through the fast tokenizer)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def join_completion(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int) -> list[int]:
    """prompt ⊕ response ⊕ EOS. A response that already ends with EOS keeps that one EOS (no second one)."""
    response = list(response_ids)
    if not response or response[-1] != eos_id:
        response.append(eos_id)
    return list(prompt_ids) + response


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest: ``(input_ids, attention_mask)``, each (N, T)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside the block; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def score_sequences(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    normalized: bool = True,
) -> torch.Tensor:
    """Reward at the last token of each complete sequence: N token lists -> (N,) float32 on the CPU.

    Sequences are sorted by length (longest first, so an out-of-memory error shows up in the first batch)
    and batched; the result is in the input order. The model's train/eval mode is restored afterwards.
    """
    if not sequences:
        return torch.zeros(0)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = torch.empty(len(sequences), dtype=torch.float32)
    with inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = pad_right([sequences[i] for i in rows], pad_id)
            batch_scores = call_on(  # through a sharded model's root (run.sharding=fsdp)
                model, last_token_scores, input_ids.to(device), attention_mask.to(device), normalized=normalized
            )  # (b,)
            scores[torch.tensor(rows)] = batch_scores.float().cpu()
    return scores


class RewardScorer:
    """Score (prompt, response) pairs with a reward model saved by ``instructrl rm`` (or one in memory).

    Args:
        path_or_model: a reward-model directory, or a loaded sequence-classification model.
        tokenizer: the tokenizer to encode text with; default: the one saved in the model directory.
        batch_size: completions per forward pass.
        device: "auto" (CUDA if available), "cpu", "cuda:0", ...; a model passed in is moved there.
    """

    def __init__(
        self,
        path_or_model: str | Path | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = "auto",
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if isinstance(path_or_model, (str, Path)):
            self.model = load_reward_model(path_or_model)
            if tokenizer is None:
                from instructrl.models.causal_lm import load_tokenizer

                tokenizer = load_tokenizer(path_or_model)
        else:
            self.model = path_or_model
            if tokenizer is None:
                raise ValueError("RewardScorer needs a tokenizer when given a model object")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.model.eval()
        self.max_len = max_positions(self.model)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _fit(self, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
        """Join a completion; drop the oldest prompt tokens if it would not fit the model's context."""
        sequence = join_completion(prompt_ids, response_ids, self.eos_id)
        if self.max_len is None or len(sequence) <= self.max_len:
            return sequence
        excess = len(sequence) - self.max_len
        if excess > len(prompt_ids):
            raise UserFacingError(
                f"a response of {len(response_ids)} tokens does not fit the reward model's context of "
                f"{self.max_len} tokens"
            )
        return sequence[excess:]  # left-truncated prompt: the end of the prompt matters most to the reply

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        normalized: bool = True,
    ) -> torch.Tensor:
        """Scores (N,) of already-tokenized prompts and responses (EOS appended unless a response ends with it)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        sequences = [self._fit(list(p), list(r)) for p, r in zip(prompt_ids, response_ids)]
        return score_sequences(self.model, sequences, self.pad_id, self.batch_size, normalized)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], normalized: bool = True, messages=None
    ) -> torch.Tensor:
        """r_θ(x, y) for each (prompt, response): (N,) float32 on the CPU, in the given order; ``messages[i]``: the
        chat turns of prompt i when it came from a chat record (or None), rendered as every stage renders prompts
        (:func:`instructrl.data.loading.model_prompt`).

        ``normalized`` adds the stored bias that makes labeler demonstrations score mean 0 (§3.5).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids(
            encode_prompts(self.tokenizer, prompts, messages), tokenize_texts(self.tokenizer, responses), normalized
        )
