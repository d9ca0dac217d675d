"""Reward and value models: a causal LM with the unembedding replaced by a projection to one scalar.

We use transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1`` so a saved reward model
loads with plain transformers. Its ``score`` head has no bias, so the InstructGPT normalization bias (the
constant that makes labeler demonstrations score mean 0) [ppo-details: rm-demonstration-bias] is stored in the
model config as ``instructrl_reward_bias`` and applied by :func:`load_reward_model` / :func:`last_token_scores`.
One-line loader: ``instructrl.models.reward.load_reward_model(path)``.

Reading positions: the reward is read at the **last response token** (the EOS) of each sequence [ppo-details:
reward-at-eos]; the value model reads the same head at every position [ppo-details: value-per-token].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from instructrl.errors import UserFacingError

BIAS_KEY = "instructrl_reward_bias"


def init_scalar_head(model: PreTrainedModel, zero: bool = False) -> None:
    """Reward head init N(0, std = 1/√(d_model+1)) [ppo-details: reward-head-init]; ``zero=True`` for a value head
    [ppo-details: value-head-zero-init]."""
    head = model.score
    with torch.no_grad():
        if zero:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def reward_model_from_causal_lm(path: str | Path, pad_token_id: int, dtype: torch.dtype = torch.float32):
    """A fresh reward model: the causal LM at ``path`` (e.g. the SFT model) with a new scalar head."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserFacingError(f"could not build a reward model from {path}: {e}") from None
    model.config.pad_token_id = pad_token_id
    setattr(model.config, BIAS_KEY, 0.0)
    init_scalar_head(model)
    return model


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a reward (or value) model saved by ``instructrl rm``; its normalization bias is in the config."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserFacingError(f"could not load a reward model from {path}: {e}") from None
    if not hasattr(model.config, BIAS_KEY):
        setattr(model.config, BIAS_KEY, 0.0)
    return model


def reward_bias(model: PreTrainedModel) -> float:
    return float(getattr(model.config, BIAS_KEY, 0.0))


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer trunk (without the scalar head) of a sequence-classification model."""
    return getattr(model, model.base_model_prefix)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, 0 at the first real token of each row [ppo-details:
    left-pad-position-ids]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_values(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar head at every position: (B, T) -> (B, T). Used by the value model."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, d)
    return model.score(hidden).squeeze(-1)  # (B, T)


def last_token_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last_index: torch.Tensor | None = None,
    normalized: bool = True,
) -> torch.Tensor:
    """Reward read at each row's last real token (or at ``last_index``): (B, T) -> (B,).

    Works for right padding (last real token = last 1 in the mask) and for left-padded prompts followed by
    a right-padded response. ``normalized`` adds the stored demonstration-mean bias.
    """
    position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, d)
    if last_index is None:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_index = (attention_mask.long() * positions).argmax(-1)  # (B,) last position with mask 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # (B, d)
    scores = model.score(picked).squeeze(-1).float()  # (B,)
    if normalized:
        scores = scores + reward_bias(model)
    return scores
