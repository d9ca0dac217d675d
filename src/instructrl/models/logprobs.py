"""Per-token log-probabilities of a causal LM, the plain way: the model's logits, then log-softmax and gather.

PPO asks a model for log π(y_t | x, y_<t) in two shapes: at the response tokens of query ⊕ response sequences
(the rollout and the policy loss) and at every token of pretraining windows (the ptx loss). :class:`FullLogits`
computes both from the model's full-vocabulary logits with :func:`instructrl.rl.logprobs_from_logits`. It is
the reference side of the log-prob seam; :class:`instructrl.fast.head.FusedHeadLogProbs` computes the same
numbers without forming the logits, and the PPO stage picks one of the two when it builds its models.

Logits at input position Q − 1 + t predict response token t, so a model is run on query ⊕ response and its
outputs at positions Q − 1 … Q + R − 2 are kept.
"""

from __future__ import annotations

import contextlib

import torch

from instructrl.models.reward import position_ids_from_mask
from instructrl.rl import entropy_from_logits, logprobs_from_logits


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Logits that predict the last ``response_len`` tokens: (B, Q + R) -> (B, R, V).

    Position ids skip the left padding [ppo-details: left-pad-position-ids]; only the R + 1 last positions are
    projected to the vocabulary (``logits_to_keep``), the last of which predicts a token after the response and
    is dropped.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # (B, R, V)


class FullLogits:
    """log π from the model's full-vocabulary logits (the log-prob seam's reference side)."""

    def responses(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response: torch.Tensor,
        temperature: float,
        with_entropy: bool = False,
    ):
        """log π(y_t | x, y_<t) at temperature τ [ppo-details: temperature-scaled-logprobs] for the last
        R = ``response.shape[1]`` tokens: (B, Q + R) -> (B, R); with ``with_entropy`` also the entropy of π_t,
        ``(logprobs, entropy)``, both without gradients (rollout scoring)."""
        with torch.no_grad() if with_entropy else contextlib.nullcontext():
            logits = response_logits(model, input_ids, attention_mask, response.shape[1])  # (B, R, V)
            logprobs = logprobs_from_logits(logits, response, temperature)
            return (logprobs, entropy_from_logits(logits, temperature)) if with_entropy else logprobs

    def texts(self, model, windows: torch.Tensor) -> torch.Tensor:
        """log π(x_t | x_<t) of pretraining windows (B, L) -> (B, L − 1), at temperature 1 (the LM itself)."""
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]  # (B, L − 1, V)
        return logprobs_from_logits(logits, windows[:, 1:], 1.0)
