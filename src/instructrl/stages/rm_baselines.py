"""What a reward model would score on its held-out pairs without learning anything from the comparisons.

Two reference orderings of each (y_w, y_l) pair, beside the RM's accuracy on the very same pairs:

- ``initial_likelihood``: the response the RM's initial causal LM π₀ (``rm``'s ``model``: the SFT model in
  InstructGPT) finds more likely, by log π₀(y | x) = Σ_t log π₀(y_t | x, y_<t) over the response and its EOS.
  This is what the model the RM starts from already knows about the labelers' preferences. An RM at or below it
  has learned less from the comparisons than its initial model knew: in the sandbox that is so at every seed
  (docs/sandbox-findings.md), because the reward is read from one position and "is this answer the likely one"
  is a product of the hidden state before the answer and the answer's embedding.
- ``longer``: the longer response (in tokens) wins. Length is the best-known shortcut a reward model can learn
  instead of content; far below 50% means the labelers prefer the shorter response, far above the longer.

Ties (equal likelihoods or lengths) count ½: a baseline that cannot separate two responses is a coin flip there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from instructrl.models.scoring import inference, pad_right
from instructrl.rl import logprobs_from_logits


def pair_accuracy(values: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> float | None:
    """Fraction of (winner, loser) index pairs with ``values[w] > values[l]``, ties counted ½; None without pairs."""
    if not pairs:
        return None
    winners = values[torch.tensor([w for w, _ in pairs])]
    losers = values[torch.tensor([lo for _, lo in pairs])]
    return ((winners > losers).double() + 0.5 * (winners == losers).double()).mean().item()


def completion_logprobs(
    model, completions: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int, batch_size: int
) -> torch.Tensor:
    """log π(y | x) of each ``prompt ⊕ response ⊕ EOS`` completion, the response's tokens and EOS summed:
    N token lists -> (N,) float64. ``prompt_lengths[i]`` is the number of prompt tokens of completion i."""
    device = next(model.parameters()).device
    totals = torch.empty(len(completions), dtype=torch.float64)
    with inference(model):
        for start in range(0, len(completions), batch_size):
            rows = range(start, min(start + batch_size, len(completions)))
            input_ids, attention_mask = pad_right([completions[i] for i in rows], pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (b, T − 1)
            # Position t predicts token t + 1: the response's tokens are predicted from position Q − 1 on.
            positions = torch.arange(logprobs.shape[1], device=device)
            starts = torch.tensor([prompt_lengths[i] - 1 for i in rows], device=device)
            in_response = (positions[None, :] >= starts[:, None]) & attention_mask[:, 1:].bool()
            totals[start : start + len(rows)] = (logprobs * in_response).sum(-1).double().cpu()
    return totals


def baseline_accuracies(model, comparisons: Sequence, pad_id: int, batch_size: int) -> dict[str, float | None]:
    """``initial_likelihood`` and ``longer`` accuracies over every pair of ``comparisons`` (encoded comparisons:
    ``completions``, ``pairs``, ``prompt_length``), under the causal LM ``model``."""
    completions = [c for comparison in comparisons for c in comparison.completions]
    prompt_lengths = [comparison.prompt_length for comparison in comparisons for _ in comparison.completions]
    pairs, offset = [], 0
    for comparison in comparisons:
        pairs += [(offset + w, offset + lo) for w, lo in comparison.pairs]
        offset += len(comparison.completions)
    if not completions:
        return {"initial_likelihood": None, "longer": None}
    likelihood = completion_logprobs(model, completions, prompt_lengths, pad_id, batch_size)
    lengths = torch.tensor([len(c) - p for c, p in zip(completions, prompt_lengths)], dtype=torch.float64)
    return {"initial_likelihood": pair_accuracy(likelihood, pairs), "longer": pair_accuracy(lengths, pairs)}
